"""Linear layers that keep their weight transposed, [in, out], for the CPU's sake, or as GGUF blocks.

A single-token decode step is a matrix-vector product bound by memory bandwidth; MKL streams a
[in, out] weight about 15% faster than PyTorch's usual [out, in] for x @ W^T (measured on the
bundled model's shapes), and larger batches run the same either way. Checkpoints store [out, in]:
`load_shard` transposes on the way in. Given `QuantizedTensor` shards instead (GGUF weights the CPU
kernels can read), the layer keeps the blocks, [out, bytes per row], and multiplies from them.
"""

from __future__ import annotations

import torch
from torch import nn

from heron import kernels
from heron.models.layers.quantized import QuantizedTensor


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.qtype: str | None = None
        self.qweight: torch.Tensor | None = None  # GGML blocks while shards load
        self.packed: kernels.PackedWeight | None = None  # what forward reads, made by pack()
        self._float_shards = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            # The kernels take and give float32; a bf16/fp16 model's activations go through them cast.
            y = kernels.packed_linear(x if x.dtype == torch.float32 else x.float(), self.packed)
            y = y if self.bias is None else y.add_(self.bias)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.bias is not None:
            return torch.addmm(self.bias, x, self.weight)
        return x @ self.weight

    def load_shard(self, name: str, tensor: torch.Tensor | QuantizedTensor, offset: int = 0) -> None:
        """Copy a checkpoint tensor ([out, in] weight or [out] bias) into rows offset.. of the output."""
        if isinstance(tensor, QuantizedTensor):
            self._load_quantized(tensor, offset)
            return
        if name == "bias":
            target = self.bias.narrow(0, offset, tensor.shape[0])
            source = tensor
        else:
            if self.qweight is not None:
                raise ValueError(f"float weight shard at offset {offset} for {self}, whose other shards are {self.qtype}")
            target = self.weight.narrow(1, offset, tensor.shape[0])
            source = tensor.t()
            self._float_shards = True
        if target.shape != source.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit {name} at offset {offset} of {self}")
        target.copy_(source)

    def _load_quantized(self, tensor: QuantizedTensor, offset: int) -> None:
        rows, cols = tensor.shape
        if cols != self.in_features or offset + rows > self.out_features:
            raise ValueError(f"shape {tensor.shape} does not fit weight at offset {offset} of {self}")
        if self.qweight is None:
            if self._float_shards:
                raise ValueError(f"{tensor.qtype} weight shard at offset {offset} for {self}, whose other shards are float")
            self.qtype = tensor.qtype
            self.qweight = torch.empty(self.out_features, tensor.blocks.shape[1], dtype=torch.uint8)
            self.weight = nn.Parameter(torch.empty(self.in_features, 0), requires_grad=False)
        elif tensor.qtype != self.qtype:
            raise ValueError(f"{tensor.qtype} weight shard for {self}, whose other shards are {self.qtype}")
        self.qweight[offset : offset + rows].copy_(tensor.blocks)

    def pack(self) -> None:
        """Once every shard is in: repack the blocks into the kernels' panel layout (and drop them)."""
        if self.qweight is not None:
            self.packed = kernels.pack_blocks(self.qweight, self.qtype, self.out_features, self.in_features)
            self.qweight = None

    def extra_repr(self) -> str:
        quant = f", weight={self.qtype} blocks" if self.qtype else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{quant}"
