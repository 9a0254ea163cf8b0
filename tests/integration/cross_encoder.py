"""A tiny random-weight BERT cross-encoder for the rerank/score tests (integration and server).

transformers builds it (BertForSequenceClassification, one label) with the bundled MiniLM's
tokenizer files beside it; every weight is redrawn so that one Heron failed to load shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MAX_POSITIONS = 128  # the tiny model's position table: its maximum input length


def build_cross_encoder(path: Path, minilm_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny random-weight BertForSequenceClassification (num_labels 1) saved at `path`."""
    import transformers  # test-only reference

    config = transformers.BertConfig(
        vocab_size=30522,  # the MiniLM tokenizer's
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=1,
        **config_overrides,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Redrawn so that a weight Heron failed to load (a norm left at 1, a bias at 0) shows.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "LayerNorm" in name else 0.1 * noise)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).exists():
            shutil.copy(minilm_dir / name, path / name)
    return path
