"""Attention over the paged KV cache.

New K/V rows are written into the cache slots the scheduler assigned, then: all decode tokens of the
batch attend together, and each prefill chunk attends causally (to its cached context too, when it
has one), with PyTorch's scaled_dot_product_attention (the fused kernel each device has). On a CPU
with Heron's kernels, every token with a KV cache, decode or prefill, instead reads K/V in place
through its slot list (heron.kernels.paged_decode_attention): gathering every sequence's cache into
a padded copy for SDPA cost more than the attention itself, and a token's result then depends only
on its own query and context. SDPA's blocking changes with the chunk, which moved results by
rounding errors: harmless for float32 activations, but enough to flip int8-quantized activations
and, from there, greedy tokens between a request run alone and in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heron import kernels
from heron.worker.forward_batch import ForwardBatch


class Attention(torch.nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.causal = causal
        self.gqa = num_heads != num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        out = torch.empty_like(q)
        k_cache = v_cache = None
        if batch.kv_caches is not None:
            k_cache, v_cache = batch.kv_caches[self.layer_idx]
            k_cache.index_copy_(0, batch.slot_mapping, k)
            v_cache.index_copy_(0, batch.slot_mapping, v)

        n = batch.num_decodes
        if n and self._paged_kernel(k_cache, batch):
            kernels.paged_decode_attention(q[:n], k_cache, v_cache, batch.decode_slots, batch.decode_lens, self.scale, out=out[:n])
        elif n:
            qd = q[:n].unsqueeze(2)  # [B, H, 1, D]
            kd = k_cache[batch.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
            vd = v_cache[batch.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=batch.decode_mask, scale=self.scale, enable_gqa=self.gqa
            )
            out[:n] = od.squeeze(2)

        prefill_kernel = self.causal and self._kernel_runs(q)
        for span in batch.prefills:
            if prefill_kernel:
                n_rows = span.end - span.start
                if span.row_lens is None:
                    span.row_lens = torch.arange(span.num_context + 1, span.num_context + n_rows + 1)
                    if k_cache is None:  # a cache-free batch: the chunk's own K/V, rows 0 ..
                        span.row_slots = torch.arange(n_rows)
                    else:
                        span.row_slots = batch.slot_mapping[span.start : span.end] if span.slots is None else span.slots
                if k_cache is None:
                    ks, vs = k[span.start : span.end].contiguous(), v[span.start : span.end].contiguous()
                else:
                    ks, vs = k_cache, v_cache
                kernels.paged_decode_attention(
                    q[span.start : span.end], ks, vs, span.row_slots, span.row_lens, self.scale,
                    out=out[span.start : span.end],
                )
                continue
            qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            if span.slots is None:
                ks = k[span.start : span.end]
                vs = v[span.start : span.end]
                mask, is_causal = None, self.causal
            else:
                ks = k_cache[span.slots]
                vs = v_cache[span.slots]
                if span.mask is None:  # made once per step, by the first layer on this path
                    # Query i (absolute position num_context + i) sees keys 0 .. num_context + i.
                    n_rows = span.end - span.start
                    span.mask = torch.ones(n_rows, span.num_context + n_rows, dtype=torch.bool, device=q.device)
                    span.mask = span.mask.tril(span.num_context)
                mask, is_causal = span.mask, False
            os_ = F.scaled_dot_product_attention(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scale,
                enable_gqa=self.gqa,
            )
            out[span.start : span.end] = os_[0].transpose(0, 1)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _paged_kernel(self, k_cache: torch.Tensor | None, batch: ForwardBatch) -> bool:
        return k_cache is not None and batch.decode_lens is not None and self._kernel_runs(k_cache)

    def _kernel_runs(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype == torch.float32 and self.head_dim % 8 == 0 and kernels.available()
