"""Fixtures for integration tests: tiny random-weight Hugging Face checkpoints written on the spot.

Nothing is downloaded. transformers builds a model from a tiny config, its weights are re-drawn so
that every parameter matters (see `randomize_weights`), and `save_pretrained` writes it to a temp dir
together with the bundled MiniLM tokenizer files (Heron's loader wants a tokenizer beside the
weights). Configs use MiniLM's vocabulary size so that its token ids are valid model inputs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY_VOCAB_SIZE = 30522  # the bundled MiniLM tokenizer's vocabulary

# Small enough to build and run in well under a second, big enough for GQA (4 query heads sharing
# 2 KV heads) and for two layers to compose.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=101,
    eos_token_id=102,
    tie_word_embeddings=False,
)


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter so that a loading mistake cannot hide.

    transformers initialises norm weights to one and biases to zero, so a norm or bias that never
    reached Heron would go unnoticed; its 0.02 init also makes logits so small that any absolute
    tolerance is loose. Here norms are drawn around one, everything else at a scale that keeps
    activations and logits of order one.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


def build_hf_model(architecture: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly weighted transformers model of `architecture` from TINY_CONFIG plus overrides."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model_class = getattr(transformers, architecture)
    config = config_class(**{**TINY_CONFIG, **overrides})
    model = model_class(config).eval()
    randomize_weights(model, seed)
    return model


def copy_tokenizer(source_dir: Path, target_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source_dir / name).exists():
            shutil.copy(source_dir / name, target_dir / name)


@pytest.fixture(scope="session")
def tiny_config() -> dict[str, Any]:
    """The base config of every tiny checkpoint (a copy: tests may not change it)."""
    return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir) -> Callable[..., Path]:
    """Factory: tiny_checkpoint(name, architecture, seed=0, save_kwargs=None, **config) -> model dir.

    Each call writes a fresh directory; the transformers model is not kept (tests reload it from
    the directory, so both sides read exactly the bytes on disk).
    """

    def make(
        name: str,
        architecture: str,
        seed: int = 0,
        save_kwargs: dict[str, Any] | None = None,
        **config: Any,
    ) -> Path:
        path = tmp_path_factory.mktemp(name)
        model = build_hf_model(architecture, seed, **config)
        model.save_pretrained(path, **(save_kwargs or {}))
        copy_tokenizer(minilm_dir, path)
        return path

    return make
