"""Linear layers that keep their weight transposed, [in, out], for the CPU's sake.

A single-token decode step is a matrix-vector product bound by memory bandwidth; MKL streams a
[in, out] weight about 15% faster than PyTorch's usual [out, in] for x @ W^T (measured on the
bundled model's shapes), and larger batches run the same either way. Checkpoints store [out, in]:
`load_shard` transposes on the way in.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return torch.addmm(self.bias, x, self.weight)
        return x @ self.weight

    def load_shard(self, name: str, tensor: torch.Tensor, offset: int = 0) -> None:
        """Copy a checkpoint tensor ([out, in] weight or [out] bias) into rows offset.. of the output."""
        if name == "bias":
            target = self.bias.narrow(0, offset, tensor.shape[0])
            source = tensor
        else:
            target = self.weight.narrow(1, offset, tensor.shape[0])
            source = tensor.t()
        if target.shape != source.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit {name} at offset {offset} of {self}")
        target.copy_(source)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
