"""CpuPagedBackend: every token's attention through Heron's paged CPU kernel, K/V read in place.

On a CPU with Heron's kernels (float32, head_dim a multiple of 8), every token with a KV cache,
decode or prefill, reads K/V in place through its slot list (heron.kernels.paged_decode_attention):
gathering every sequence's cache into a padded copy for SDPA cost more than the attention itself,
and a token's result then depends only on its own query and context. SDPA's blocking changes with
the chunk, which moved results by rounding errors: harmless for float32 activations, but enough to
flip int8-quantized activations and, from there, greedy tokens between a request run alone and in a
batch. A cache-free batch (whole sequences, heron.worker.forward_batch.ForwardBatch.for_sequences)
runs the same kernel over each sequence's own K/V, causally.

The metadata holds, per step: the decodes' padded slot table and lengths (one kernel call for all of
them), and for each prefill chunk the one slot list all its rows share and each row's length (its
context and itself), which is what makes the chunk causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron import kernels
from heron.worker.attention.base import AttentionBackend, AttentionLayer, sequence_spans, slot_table, write_kv_cache
from heron.worker.forward_batch import ForwardBatch


@dataclass(frozen=True)
class CpuPagedPrefill:
    """One prefill chunk: tokens [start, end) of the batch."""

    start: int
    end: int
    # Slots of the sequence's positions 0 .. its last new token, shared by every row; in a
    # cache-free batch, rows 0 .. of the chunk's own K/V.
    slots: torch.Tensor
    row_lens: torch.Tensor  # [end - start]: context + 1, context + 2, ...


@dataclass(frozen=True)
class CpuPagedMetadata:
    slot_mapping: torch.Tensor | None  # None: a cache-free batch
    num_decodes: int
    decode_slots: torch.Tensor | None  # [num_decodes, longest decode] slots, padded
    decode_lens: torch.Tensor | None  # [num_decodes] positions each decode attends to (with itself)
    prefills: list[CpuPagedPrefill]


class CpuPagedBackend(AttentionBackend[CpuPagedMetadata]):
    name = "cpu-paged"

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and head_dim % 8 == 0 and kernels.available()

    def build_metadata(self, batch: ForwardBatch) -> CpuPagedMetadata:
        spans = sequence_spans(batch)
        n = batch.num_decodes
        decode_slots = decode_lens = None
        if n:
            lengths = [span.num_context + 1 for span in spans[:n]]
            decode_slots = slot_table(batch.block_tables[:n], lengths, batch.block_size)
            decode_lens = torch.tensor(lengths)
        prefills = []
        for span in spans[n:]:
            total = span.num_context + span.num_tokens
            if batch.kv_caches is None:
                slots = torch.arange(span.num_tokens)
            else:
                slots = slot_table([batch.block_tables[span.index]], [total], batch.block_size)[0]
            prefills.append(CpuPagedPrefill(span.start, span.end, slots, torch.arange(span.num_context + 1, total + 1)))
        return CpuPagedMetadata(batch.slot_mapping, n, decode_slots, decode_lens, prefills)

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        metadata: CpuPagedMetadata,
    ) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype)
        if kv_cache is not None:
            write_kv_cache(kv_cache, k, v, metadata.slot_mapping)
        n = metadata.num_decodes
        if n:
            k_cache, v_cache = kv_cache
            kernels.paged_decode_attention(
                q[:n], k_cache, v_cache, metadata.decode_slots, metadata.decode_lens, layer.scale, out=out[:n]
            )
        for p in metadata.prefills:
            if kv_cache is None:  # the chunk's own K/V is the "cache" its slot list indexes
                ks, vs = k[p.start : p.end].contiguous(), v[p.start : p.end].contiguous()
            else:
                ks, vs = kv_cache
            kernels.paged_decode_attention(q[p.start : p.end], ks, vs, p.slots, p.row_lens, layer.scale, out=out[p.start : p.end])
        return out.view(q.shape[0], layer.num_heads * layer.head_dim)
