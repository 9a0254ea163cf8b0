"""Which executor runs a replica's steps: one worker here, tensor-parallel ranks in local processes,
or ranks as Ray actors (--tensor-parallel-size, --distributed-executor-backend)."""

from __future__ import annotations

from heron.engine.executor import Executor
from heron.models.loader import LoadedModel


def make_executor(
    loaded: LoadedModel,
    tensor_parallel_size: int = 1,
    backend: str = "mp",
    ray_address: str | None = None,
) -> Executor:
    """`loaded` holds the weights when tensor_parallel_size is 1 and the backend is mp; otherwise
    it may be a description only (load_model(with_weights=False)): the ranks load their shards."""
    if backend == "ray":
        from heron.distributed.ray_backend import RayExecutor

        return RayExecutor(loaded, tensor_parallel_size, ray_address)
    if backend != "mp":
        raise ValueError(f"unknown distributed executor backend {backend!r} (mp or ray)")
    if tensor_parallel_size == 1:
        from heron.engine.executor.uniproc import UniprocExecutor

        return UniprocExecutor(loaded)
    from heron.engine.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(loaded, tensor_parallel_size)
