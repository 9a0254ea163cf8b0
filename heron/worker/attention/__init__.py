"""Attention backends, one file each, behind heron.worker.attention.base's interface.

`choose_backend` picks the one a model runs for its device, dtype and head size, once, when the
model is prepared: the first of BACKENDS that supports them. SDPA, last, runs anywhere. A new
backend (a CUDA flash-style kernel reading the block tables) is one new file here and one entry in
BACKENDS ahead of SDPA.
"""

from __future__ import annotations

import torch

from heron.worker.attention.base import AttentionBackend, AttentionLayer
from heron.worker.attention.cpu_paged import CpuPagedBackend
from heron.worker.attention.sdpa import SdpaBackend

__all__ = ["BACKENDS", "AttentionBackend", "AttentionLayer", "CpuPagedBackend", "SdpaBackend", "choose_backend"]

# In order of preference.
BACKENDS: tuple[type[AttentionBackend], ...] = (CpuPagedBackend, SdpaBackend)


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    return next(backend() for backend in BACKENDS if backend.supports(device, dtype, head_dim))
