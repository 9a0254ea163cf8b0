"""Sentence-transformers-style pooling of encoder outputs into one embedding per sequence.

Owns `PoolingConfig` (read from a sentence-transformers model directory: `modules.json`, the Pooling
module's `config.json`, `sentence_bert_config.json`) and `Pooler`, which turns packed last hidden
states `[total_tokens, hidden]` plus sequence lengths into `[num_seqs, hidden]` float32 vectors,
L2-normalised when the model ends in a Normalize module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last", "max")

# sentence-transformers Pooling config flag -> our mode name
_ST_MODE_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
}
# Flags for poolings we do not implement; accepting them silently would give wrong vectors.
_ST_UNSUPPORTED_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")

# Module types in modules.json that change the vectors; any other type (Dense, LayerNorm, ...) would
# need weights we do not load, so we refuse it rather than serve different embeddings.
_ST_TRANSFORMER = "Transformer"
_ST_POOLING = "Pooling"
_ST_NORMALIZE = "Normalize"


class UnsupportedPoolingConfig(ValueError):
    """A sentence-transformers directory asks for a pipeline this pooler cannot reproduce."""


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _mode_from_st_pooling(cfg: dict) -> str:
    # Newer sentence-transformers versions may store the mode as a plain string.
    if isinstance(cfg.get("pooling_mode"), str):
        mode = {"lasttoken": "last"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
        if mode not in POOLING_MODES:
            raise UnsupportedPoolingConfig(f"pooling mode {cfg['pooling_mode']!r} is not supported")
        return mode
    unsupported = [flag for flag in _ST_UNSUPPORTED_FLAGS if cfg.get(flag)]
    if unsupported:
        raise UnsupportedPoolingConfig(f"pooling modes {unsupported} are not supported")
    modes = [mode for flag, mode in _ST_MODE_FLAGS.items() if cfg.get(flag)]
    if len(modes) > 1:
        # sentence-transformers would concatenate them into a wider vector.
        raise UnsupportedPoolingConfig(f"combined pooling modes {modes} are not supported")
    return modes[0] if modes else "mean"


@dataclass(frozen=True)
class PoolingConfig:
    """How to turn token states into a sentence embedding."""

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    dimension: int = 0

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")

    @classmethod
    def from_sentence_transformers_dir(cls, path: str | Path) -> "PoolingConfig":
        """Read the pooling pipeline of a sentence-transformers directory.

        A plain transformers directory (no sentence-transformers files) gets mean pooling without
        normalisation and no length cap beyond the model's own; `dimension` then comes from
        `config.json`'s `hidden_size`.
        """
        root = Path(path)
        modules = _read_json(root / "modules.json")
        pooling_dir: Path | None = None
        normalize = False
        if isinstance(modules, list):
            for module in modules:
                kind = str(module.get("type", "")).rsplit(".", 1)[-1]
                if kind == _ST_POOLING:
                    pooling_dir = root / module.get("path", "")
                elif kind == _ST_NORMALIZE:
                    normalize = True
                elif kind != _ST_TRANSFORMER:
                    raise UnsupportedPoolingConfig(
                        f"sentence-transformers module {module.get('type')!r} is not supported"
                    )
        elif (root / "1_Pooling" / "config.json").is_file():
            pooling_dir = root / "1_Pooling"

        pooling_cfg = _read_json(pooling_dir / "config.json") if pooling_dir else None
        pooling_cfg = pooling_cfg if isinstance(pooling_cfg, dict) else {}
        mode = _mode_from_st_pooling(pooling_cfg)

        dimension = pooling_cfg.get("word_embedding_dimension")
        if dimension is None:
            model_cfg = _read_json(root / "config.json")
            dimension = model_cfg.get("hidden_size", 0) if isinstance(model_cfg, dict) else 0

        st_cfg = _read_json(root / "sentence_bert_config.json")
        max_seq_length = st_cfg.get("max_seq_length") if isinstance(st_cfg, dict) else None

        return cls(
            mode=mode,
            normalize=normalize,
            max_seq_length=int(max_seq_length) if max_seq_length is not None else None,
            dimension=int(dimension),
        )


class Pooler:
    """Applies a `PoolingConfig` to packed hidden states.

    Works on the packed layout directly (segment sums / index picks), so there is no per-sequence
    Python loop and no padded copy of the hidden states.
    """

    def __init__(self, config: PoolingConfig):
        self.config = config

    def __call__(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        if not seq_lens or min(seq_lens) <= 0:
            raise ValueError(f"seq_lens must be non-empty positive lengths, got {seq_lens}")
        if sum(seq_lens) != hidden.shape[0]:
            raise ValueError(
                f"seq_lens sum to {sum(seq_lens)} but hidden holds {hidden.shape[0]} tokens"
            )
        device = hidden.device
        num_seqs = len(seq_lens)
        # Accumulate in float32: bf16 sums over hundreds of tokens lose visible precision.
        hidden = hidden.float()
        lens = torch.tensor(seq_lens, device=device)
        mode = self.config.mode
        if mode in ("cls", "last"):
            ends = torch.cumsum(lens, 0)
            pooled = hidden.index_select(0, ends - lens if mode == "cls" else ends - 1)
        else:
            seq_of_token = torch.repeat_interleave(
                torch.arange(num_seqs, device=device), lens, output_size=hidden.shape[0]
            )
            if mode == "mean":
                sums = hidden.new_zeros(num_seqs, hidden.shape[-1])
                sums.index_add_(0, seq_of_token, hidden)
                pooled = sums / lens[:, None].to(hidden.dtype)
            else:  # max
                index = seq_of_token[:, None].expand_as(hidden)
                pooled = hidden.new_full((num_seqs, hidden.shape[-1]), float("-inf"))
                pooled.scatter_reduce_(0, index, hidden, "amax", include_self=True)
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return pooled
