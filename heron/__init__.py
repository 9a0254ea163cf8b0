"""Heron: a small, fast LLM serving engine with an OpenAI-compatible HTTP API."""

from heron.outputs import CompletionOutput, FinishReason, RequestOutput
from heron.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; load it only when asked for.
    if name == "LLM":
        from heron.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'heron' has no attribute {name!r}")
