"""RMSNorm, computed in float32 as the reference implementations do, returned in the run dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        out = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * out.to(x.dtype)
