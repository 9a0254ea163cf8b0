"""SdpaBackend: attention with PyTorch's scaled_dot_product_attention, on any device and dtype.

All decode tokens of a step attend together, as one padded group: their context is gathered from
the cache into [num_decodes, Hkv, longest, D] and a mask hides each row's padding. Each prefill
chunk attends as one causal block: to its own new K/V when it has no cached context, else to its
sequence's K/V gathered from the cache under a mask that lets query i (position num_context + i)
see keys 0 .. num_context + i. SDPA picks the fused kernel each device has; its blocking depends on
the shapes it is given, so a token's result can move by rounding errors with the batch around it
(heron.worker.attention.cpu_paged says why the CPU path avoids that). The masks and slot tables are
built once per step, in the metadata, and every layer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heron.worker.attention.base import AttentionBackend, AttentionLayer, sequence_spans, slot_table, write_kv_cache
from heron.worker.forward_batch import ForwardBatch


@dataclass(frozen=True)
class SdpaPrefill:
    """One prefill chunk: tokens [start, end) of the batch."""

    start: int
    end: int
    # With cached context: the slots of the sequence's positions 0 .. its last new token, and the
    # causal mask over them [end - start, num_context + end - start]. Without: both None, and the
    # chunk attends to its own new K/V with SDPA's is_causal.
    slots: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class SdpaMetadata:
    slot_mapping: torch.Tensor | None  # None: a cache-free batch
    num_decodes: int
    decode_slots: torch.Tensor | None  # [num_decodes, longest decode] slots, padded
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, longest decode] True = attend
    prefills: list[SdpaPrefill]


class SdpaBackend(AttentionBackend[SdpaMetadata]):
    name = "sdpa"

    def build_metadata(self, batch: ForwardBatch) -> SdpaMetadata:
        device = batch.input_ids.device
        spans = sequence_spans(batch)
        n = batch.num_decodes
        decode_slots = decode_mask = None
        if n:
            lengths = [span.num_context + 1 for span in spans[:n]]
            decode_slots = slot_table(batch.block_tables[:n], lengths, batch.block_size).to(device)
            lens = torch.tensor(lengths, device=device)
            decode_mask = (torch.arange(decode_slots.shape[1], device=device)[None, :] < lens[:, None])[:, None, None, :]
        prefills = []
        for span in spans[n:]:
            slots = mask = None
            if span.num_context:
                total = span.num_context + span.num_tokens
                slots = slot_table([batch.block_tables[span.index]], [total], batch.block_size)[0].to(device)
                mask = torch.ones(span.num_tokens, total, dtype=torch.bool, device=device).tril(span.num_context)
            prefills.append(SdpaPrefill(span.start, span.end, slots, mask))
        return SdpaMetadata(batch.slot_mapping, n, decode_slots, decode_mask, prefills)

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        metadata: SdpaMetadata,
    ) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        gqa = layer.num_heads != layer.num_kv_heads
        if kv_cache is not None:
            write_kv_cache(kv_cache, k, v, metadata.slot_mapping)
        n = metadata.num_decodes
        if n:
            k_cache, v_cache = kv_cache
            qd = q[:n].unsqueeze(2)  # [B, H, 1, D]
            kd = k_cache[metadata.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
            vd = v_cache[metadata.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=metadata.decode_mask, scale=layer.scale, enable_gqa=gqa)
            out[:n] = od.squeeze(2)
        for p in metadata.prefills:
            qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            if p.slots is None:
                ks, vs = k[p.start : p.end], v[p.start : p.end]
            else:
                k_cache, v_cache = kv_cache
                ks, vs = k_cache[p.slots], v_cache[p.slots]
            os_ = F.scaled_dot_product_attention(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask,
                is_causal=p.mask is None,
                scale=layer.scale,
                enable_gqa=gqa,
            )
            out[p.start : p.end] = os_[0].transpose(0, 1)
        return out.view(q.shape[0], layer.num_heads * layer.head_dim)
