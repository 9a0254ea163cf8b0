"""The attention-backend interface: per-step metadata built once, then one call per layer.

A backend turns a step's ForwardBatch into its own metadata once (`build_metadata`: slot tables,
lengths, masks, laid out as its kernels read them), and each decoder layer then calls
`forward(layer, q, k, v, kv_cache, metadata)` with its own q/k/v, its own layer's (k_cache,
v_cache) or None for a cache-free batch, and that metadata. The backend writes the new tokens' K/V
into the cache before it reads, so one with a fused cache write can use it. Which backend runs is
decided once, when the model is prepared for its device and dtype (heron.worker.attention).
The helpers below are the layout every backend starts from: where each sequence's tokens lie in the
batch, and which cache slots hold a sequence's positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from heron.worker.forward_batch import ForwardBatch

M = TypeVar("M")


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's attention geometry: what a backend needs besides the tensors."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


class AttentionBackend(ABC, Generic[M]):
    name: str

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this backend runs here; a backend that runs anywhere keeps this default."""
        return True

    @abstractmethod
    def build_metadata(self, batch: ForwardBatch) -> M:
        """What every layer of this step reads besides its tensors, made once per step.
        Raises ValueError for a batch the backend cannot run (a cache-free batch with context)."""

    @abstractmethod
    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        metadata: M,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of the batch's new tokens -> [T, H * D]."""


@dataclass(frozen=True)
class SequenceSpan:
    """Sequence `index` of a step: tokens [start, end) of the batch, after `num_context` cached ones."""

    index: int
    start: int
    end: int
    num_context: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def sequence_spans(batch: ForwardBatch) -> list[SequenceSpan]:
    """Every sequence's span, in batch order. Raises ValueError for cached context without a cache."""
    if batch.kv_caches is None and any(batch.context_lens):
        raise ValueError("a cache-free batch cannot have cached context")
    spans, start = [], 0
    for i, (num_tokens, num_context) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True)):
        spans.append(SequenceSpan(i, start, start + num_tokens, num_context))
        start += num_tokens
    return spans


def slot_table(block_tables: list[list[int]], lengths: list[int], block_size: int) -> torch.Tensor:
    """[len(lengths), max(lengths)] int64 (on the CPU): row i holds the cache slots of positions
    0 .. lengths[i] - 1 of the sequence with block table block_tables[i], padded with slot 0."""
    max_len = max(lengths)
    num_blocks = -(-max_len // block_size)
    rows = [table[:num_blocks] + [0] * (num_blocks - min(len(table), num_blocks)) for table in block_tables]
    blocks = torch.tensor(rows, dtype=torch.long)
    slots = (blocks[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :max_len]
    # Past a row's length, slot 0: a real slot whatever the tables hold, so a padded read (SDPA
    # gathers, then masks it) never leaves the cache.
    past_end = torch.arange(max_len) >= torch.tensor(lengths)[:, None]
    return slots.masked_fill_(past_end, 0).contiguous()


def write_kv_cache(kv_cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V [T, Hkv, D] in their slots of this layer's cache."""
    k_cache, v_cache = kv_cache
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
