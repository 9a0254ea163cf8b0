"""Weights kept in their GGUF block format, and the embedding that can read them.

A `QuantizedTensor` is a 2-D weight as GGML blocks ([rows, bytes per row] of uint8). The loader hands
these to `load_weights` instead of dequantized float32 copies when the CPU kernels (heron.kernels)
can run here; layers that receive one (Linear, `Embedding`) keep them, repacked for the kernels'
matmul, and drop their float32 storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heron import kernels


@dataclass
class QuantizedTensor:
    qtype: str  # GGML type name: "Q4_0", "Q4_1" or "Q8_0"
    blocks: torch.Tensor  # uint8 [rows, bytes per row]
    shape: tuple[int, int]  # the float weight's [out, in]

    def with_blocks(self, blocks: torch.Tensor) -> "QuantizedTensor":
        return QuantizedTensor(self.qtype, blocks.reshape(self.blocks.shape).contiguous(), self.shape)


class Embedding(nn.Embedding):
    """Token embedding that can keep its table as GGUF blocks; then `project` is the tied LM head."""

    qtype: str | None = None
    qweight: torch.Tensor | None = None  # the blocks, for lookups
    packed: kernels.PackedWeight | None = None  # the same table in panels, for the tied LM head

    def load_quantized(self, tensor: QuantizedTensor) -> None:
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding of shape {tensor.shape} does not fit {self}")
        self.qtype, self.qweight = tensor.qtype, tensor.blocks
        self.packed = kernels.pack_blocks(tensor.blocks, tensor.qtype, self.num_embeddings, self.embedding_dim)
        # The float table is no longer read: free it (the tied LM head reads the packed copy).
        self.weight = nn.Parameter(torch.empty(0, self.embedding_dim, dtype=self.weight.dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return super().forward(ids)
        rows = kernels.quant_rows(self.qweight, self.qtype, self.embedding_dim, ids.reshape(-1))
        # The model's other weights may be bf16/fp16: the rows join them in that dtype.
        return rows.reshape(*ids.shape, -1).to(self.weight.dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] @ table^T from the packed table: the logits of a tied LM head, float32."""
        return kernels.packed_linear(hidden.float(), self.packed)
