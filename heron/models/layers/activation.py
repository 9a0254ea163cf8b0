"""Gated activations for fused gate/up projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated_activation(name: str):
    """act(gate) * up over a fused [..., 2 * I] tensor holding gate then up."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    act = _ACTIVATIONS[name]

    def apply(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return apply
