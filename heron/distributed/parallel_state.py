"""The tensor-parallel group of this process, how a model splits over it, and its collectives.

A process is one rank of a tensor-parallel group of `size` ranks (size 1, rank 0 outside a
tensor-parallel worker). Model code reads `get_tp()` when it builds its layers and loads its weights:
query heads, MLP columns and vocabulary rows are split evenly over the ranks; KV heads too, or, when
there are fewer KV heads than ranks, each rank keeps the one its query heads read (replicated).
`TPLayout` is that arithmetic, in one place, and `check_tp_layout` refuses a split that cannot work
before any worker starts. `all_reduce` / `all_gather` are no-ops at size 1, so single-process code
pays nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from heron.distributed.shm_comm import ShmComm

# A collective that waits longer than this has lost a peer (its death is normally seen sooner, by
# the executor watching the processes); gloo's own default is 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    # Ranks on one machine: collectives through shared memory (heron.distributed.shm_comm), with
    # torch.distributed for tensors too large for its slots.
    shm: ShmComm | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        if self.size > 1:
            if self.shm is not None and self.shm.fits(x):
                return self.shm.all_reduce(x)
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` (same shape on each) along `dim`, in rank order."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_gather(x, dim)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)


_TP = TPGroup()


def get_tp() -> TPGroup:
    return _TP


def init_tp(rank: int, size: int, init_method: str, backend: str, shared_memory: str | None = None) -> TPGroup:
    """Join the group (a worker calls this once, before it builds the model). `shared_memory`: a
    /dev/shm path every rank of the group is given when they all run on this machine (the mp
    executor's ranks); rank 0 creates it, and it is unlinked once every rank has it mapped."""
    global _TP
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    shm = None
    if shared_memory is not None and size > 1:
        if rank == 0:
            shm = ShmComm(shared_memory, rank, size, create=True)
        dist.barrier()
        if rank != 0:
            shm = ShmComm(shared_memory, rank, size, create=False)
        dist.barrier()
        if rank == 0:
            os.unlink(shared_memory)
    _TP = TPGroup(rank, size, shm)
    return _TP


def destroy_tp() -> None:
    global _TP
    if _TP.shm is not None:
        _TP.shm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = TPGroup()


@dataclass(frozen=True)
class TPLayout:
    """Where one rank's share of a decoder lies, in the checkpoint's full tensors."""

    rank: int
    size: int
    num_heads: int  # the model's
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def first_head(self) -> int:
        return self.rank * self.local_heads

    @property
    def first_kv_head(self) -> int:
        if self.num_kv_heads >= self.size:
            return self.rank * self.local_kv_heads
        # Fewer KV heads than ranks: the KV head this rank's query heads read, kept on several ranks.
        return self.first_head // (self.num_heads // self.num_kv_heads)

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.size

    @property
    def vocab_per_rank(self) -> int:
        """Rows of the embedding / LM head each rank holds (the last one padded past the vocabulary)."""
        return -(-self.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def rows(self, part: str) -> tuple[int, int]:
        """(first row, rows) of this rank's slice of a column-parallel checkpoint tensor's dim 0."""
        if part == "q_proj":
            return self.first_head * self.head_dim, self.local_heads * self.head_dim
        if part in ("k_proj", "v_proj"):
            return self.first_kv_head * self.head_dim, self.local_kv_heads * self.head_dim
        if part in ("gate_proj", "up_proj"):
            return self.rank * self.local_intermediate, self.local_intermediate
        raise KeyError(part)

    def columns(self, part: str) -> tuple[int, int]:
        """(first column, columns) of this rank's slice of a row-parallel tensor's input dim."""
        if part == "o_proj":
            return self.first_head * self.head_dim, self.local_heads * self.head_dim
        if part == "down_proj":
            return self.rank * self.local_intermediate, self.local_intermediate
        raise KeyError(part)


def check_tp_layout(size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Raise ValueError, with what would work, if a model cannot split over `size` ranks."""
    if size < 1:
        raise ValueError("--tensor-parallel-size must be at least 1")
    if size == 1:
        return
    if num_heads % size:
        ok = [n for n in range(1, num_heads + 1) if num_heads % n == 0 and _kv_ok(n, num_heads, num_kv_heads)]
        raise ValueError(
            f"--tensor-parallel-size {size} does not divide the model's {num_heads} attention heads "
            f"(sizes that do: {', '.join(map(str, ok))})"
        )
    if not _kv_ok(size, num_heads, num_kv_heads):
        raise ValueError(
            f"--tensor-parallel-size {size} cannot split the model's {num_kv_heads} KV heads: it must divide "
            f"them, or be a multiple of them"
        )
    if intermediate_size % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide the MLP's {intermediate_size} columns")


def _kv_ok(size: int, num_heads: int, num_kv_heads: int) -> bool:
    # Fewer KV heads than ranks: each KV head is kept by size / num_kv_heads ranks, whose query heads
    # (num_heads / size each, dividing num_heads / num_kv_heads) all read it.
    return num_kv_heads % size == 0 if num_kv_heads >= size else size % num_kv_heads == 0
