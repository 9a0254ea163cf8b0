"""DecoderOps: a decoder layer's elementwise ops, chosen once for the device and dtype a model runs in.

Three ops have two implementations: a residual add with the RMSNorm after it, RoPE on Q and K, and
the gated activation over the fused gate/up output. `DecoderOps` runs PyTorch's, on any device and
dtype. `CpuKernelOps` runs Heron's native kernels (float32 on a CPU that has them): the residual
add fused into the norm (x updated in place, one pass over the hidden states), Q and K rotated in
place (the same bits as the table lookup: the kernel multiplies and adds as PyTorch does, unfused),
and SiLU(gate) * up in one pass. The model takes one of them when it is prepared
(`DecoderOps.choose`), so its forward has one code path.
"""

from __future__ import annotations

import torch

from heron import kernels
from heron.models.arch_config import ArchConfig
from heron.models.layers.activation import gated_activation
from heron.models.layers.norm import RMSNorm
from heron.models.layers.rotary import RotaryEmbedding, apply_rotary


class DecoderOps:
    name = "torch"

    def __init__(self, config: ArchConfig, dtype: torch.dtype):
        self.dtype = dtype
        self._act = gated_activation(config.hidden_act)

    @staticmethod
    def choose(config: ArchConfig, device: torch.device, dtype: torch.dtype, rotary: RotaryEmbedding) -> "DecoderOps":
        """The kernels' ops where they can run this model here, else PyTorch's. Raises ValueError for
        an activation neither has."""
        fused = (
            device.type == "cpu"
            and dtype == torch.float32
            and config.hidden_size % 8 == 0
            and config.head_dim % 16 == 0
            and rotary.cos_cache.dtype == torch.float32
            and kernels.available()
        )
        return CpuKernelOps(config, dtype) if fused else DecoderOps(config, dtype)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding `delta` (when given), and its norm."""
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def rope_inputs(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What `rotate` reads for the batch's positions; made once per forward, read by every layer."""
        return rotary.lookup(positions, self.dtype)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] rotated by their tokens' positions."""
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def gated_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up over [T, 2 * I] holding gate then up."""
        return self._act(gate_up)


class CpuKernelOps(DecoderOps):
    name = "cpu-kernels"

    def __init__(self, config: ArchConfig, dtype: torch.dtype):
        super().__init__(config, dtype)
        self._silu_mul = config.hidden_act == "silu" and config.intermediate_size % 8 == 0

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return x, kernels.add_rms_norm(x, delta, norm.weight, norm.eps)

    def rope_inputs(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return positions, rotary.cos_cache, rotary.sin_cache

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # In place, also in views of the fused Q/K/V projection: rows may be strided, heads not.
        for x in (q, k):
            if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
                raise ValueError("rotate: each row's heads must lie contiguous")
        if k.stride(0) == q.stride(0) and k.data_ptr() == q.data_ptr() + q[0].numel() * q.element_size():
            # K's heads follow Q's in each row (Llama's fused projection): one call for both. Each
            # native call gives the GIL up and must win it back, which costs up to the switch
            # interval per call while other threads (grammar compiles) run Python.
            kernels.rotary_(q, q.shape[1] + k.shape[1], q.shape[2], *rope)
        else:
            for x in (q, k):
                kernels.rotary_(x, x.shape[1], x.shape[2], *rope)
        return q, k

    def gated_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(gate_up) if self._silu_mul else super().gated_act(gate_up)
