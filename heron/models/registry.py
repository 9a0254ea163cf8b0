"""Architecture name (Hugging Face `architectures[0]`) -> Heron model class.

GGUF files name their architecture differently (`general.architecture`); ArchConfig translates
those to these names first. Classes are imported lazily so that listing stays cheap.
"""

from __future__ import annotations

import importlib

# name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("heron.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("heron.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("heron.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("heron.models.qwen3", "Qwen3ForCausalLM"),
    "BertModel": ("heron.models.bert", "BertModel"),
    "BertForSequenceClassification": ("heron.models.bert", "BertForSequenceClassification"),
}

EMBEDDING_ARCHITECTURES = frozenset({"BertModel"})
# Encoders that score a (query, document) pair as one sequence: rerankers, served on /v1/rerank
# and /v1/score. Like embedding models they run on the encoder path (heron.engine.embedding).
CROSS_ENCODER_ARCHITECTURES = frozenset({"BertForSequenceClassification"})
ENCODER_ARCHITECTURES = EMBEDDING_ARCHITECTURES | CROSS_ENCODER_ARCHITECTURES


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; Heron supports: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
