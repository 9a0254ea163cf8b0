"""Data-parallel replicas: an engine core in its own process, and its proxy in the API process.

`EngineReplica` lives in the replica process (built there by heron.distributed.procs, or as a Ray
actor): it loads the model (its own weights and KV cache) and builds its EngineCore exactly as the
single-engine server does (heron.server.registry.build_core), then answers `add_request`,
`abort_request` and `step` calls, each reply carrying a `ReplicaSnapshot` of the counters the API
process shows (scheduler and KV-cache gauges, cumulative token counts, whether work is left).

`RemoteCore` is that core seen from the API process: it has the surface of EngineCore that
AsyncEngine uses, so each replica is driven by a plain `AsyncEngine(RemoteCore(...))` (one engine
thread per replica, blocking on the pipe while its replica steps) and streaming, aborts, n > 1,
request failures and engine death all follow AsyncEngine's code. Every call is synchronous and
in order; `has_unfinished()` and the gauges are read from the last snapshot, with no round trip.

What crosses the boundary is plain data: SamplingParams, RequestOutput (and the RequestFailedError
on it), ReplicaSnapshot. A CompiledGrammar does not: its llguidance matcher is native state. The
API process compiles (validating the spec, so a bad schema is a 400 before any replica sees it) and
sends only the spec; the replica compiles it again with its own GrammarCompiler, built from the same
tokenizer and limits, whose cache makes a spec sent again free. (A large schema's first compile thus
also runs once per replica, on its engine thread.)

Death: a replica process that exits makes the next call raise WorkerDiedError (procs never hang).
Out of `step()` that kills that replica's AsyncEngine (its requests fail with EngineDeadError); out
of `add_request()` it is turned into EngineDeadError for that one caller, and the next step notices.

Threads: each replica process runs torch on max(1, cpus // data_parallel_size) threads, which a
tensor-parallel executor inside it splits again over its ranks: cpus // (dp * tp) per worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from heron.distributed.procs import RemoteHandle, WorkerDiedError
from heron.engine.core import CoreCounters
from heron.engine.errors import EngineDeadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSnapshot:
    """A replica's state after its latest call: whether work is left, and its core's counters."""

    has_unfinished: bool = False
    counters: CoreCounters = CoreCounters()


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica reports once it is built."""

    index: int
    pid: int
    runtime: Any  # heron.engine.core.EngineRuntime
    weight_bytes: int
    device: str
    torch_threads: int
    snapshot: ReplicaSnapshot


def replica_threads(settings, cpus: int | None = None) -> int:
    """Torch threads for one replica process: the CPUs shared by its replicas."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, cpus // max(1, settings.data_parallel_size))


def _replica_device(index: int, device: str) -> str:
    """Replicas spread over the visible GPUs (cuda:index mod count); on CPU, as asked."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


class EngineReplica:
    """The object in a replica process: one engine core on its own copy of the model."""

    def __init__(self, index: int, model_source: str, settings):
        import torch

        from heron.engine.executor.factory import make_executor
        from heron.models.loader import load_model
        from heron.server.registry import _weight_bytes, build_core

        threads = replica_threads(settings)
        torch.set_num_threads(threads)
        tp, backend = settings.tensor_parallel_size, settings.distributed_executor_backend
        # With tensor-parallel ranks (or Ray) the ranks load their shards; this process needs none.
        with_weights = tp == 1 and backend == "mp"
        device = _replica_device(index, settings.device) if tp == 1 else settings.device
        loaded = load_model(model_source, dtype=settings.dtype, device=device, progress=False, with_weights=with_weights)
        self.index = index
        self.core = build_core(loaded, settings, make_executor(loaded, tp, backend, settings.ray_address))
        try:
            self.core.grammar_compiler.prepare()
        except Exception as exc:  # noqa: BLE001 - the API process already warned; requests will say why
            logger.debug("replica %d: structured outputs unavailable: %s", index, exc)
        self.info = ReplicaInfo(
            index=index,
            pid=os.getpid(),
            runtime=self.core.runtime,
            weight_bytes=_weight_bytes(loaded.model) if loaded.model is not None else 0,
            device=str(loaded.device),
            torch_threads=threads,
            snapshot=self.snapshot(),
        )

    def describe(self) -> ReplicaInfo:
        return self.info

    def snapshot(self) -> ReplicaSnapshot:
        return ReplicaSnapshot(self.core.has_unfinished(), self.core.counters())

    def add_request(self, request_id, prompt_token_ids, params, cache_salt, grammar_spec, arrival_time) -> ReplicaSnapshot:
        """`grammar_spec`: the StructuredOutputsParams the API process compiled (it sends no matcher);
        compiled again here, from this replica's cache when it has seen the spec."""
        grammar = self.core.grammar_compiler.compile(grammar_spec) if grammar_spec is not None else None
        self.core.add_request(request_id, prompt_token_ids, params, cache_salt, grammar, arrival_time=arrival_time)
        return self.snapshot()

    def abort_request(self, request_id: str) -> tuple[bool, ReplicaSnapshot]:
        return self.core.abort_request(request_id), self.snapshot()

    def step(self) -> tuple[list, ReplicaSnapshot]:
        outputs = self.core.step() if self.core.has_unfinished() else []
        return outputs, self.snapshot()

    def close(self) -> None:
        self.core.shutdown()


def start_replica(index: int, model_source: str, settings) -> RemoteHandle:
    """Start replica `index` (it loads `model_source` itself); wait for it with `wait_ready()`."""
    if settings.distributed_executor_backend == "ray":
        from heron.distributed.ray_backend import start_ray_replica

        return start_ray_replica(index, model_source, settings)
    from heron.distributed.procs import ProcessHandle

    threads = str(replica_threads(settings))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env.update(_replica_gpus(index, settings))
    return ProcessHandle(f"engine replica {index}", EngineReplica, (index, model_source, settings), env=env)


def _replica_gpus(index: int, settings) -> dict[str, str]:
    """With tensor-parallel replicas on CUDA, replica i sees only its own GPUs (i*T .. i*T + T - 1),
    so that its ranks' cuda:0 .. cuda:T-1 never land on another replica's."""
    tp = settings.tensor_parallel_size
    if tp == 1 or settings.device not in ("auto", "cuda"):
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    need = settings.data_parallel_size * tp
    if len(gpus) < need:
        raise ValueError(f"--data-parallel-size {settings.data_parallel_size} x --tensor-parallel-size {tp} needs "
                         f"{need} GPUs; {len(gpus)} are visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[index * tp : (index + 1) * tp])}


# ---------------------------------------------------------------------------------------------
# The API process's side
# ---------------------------------------------------------------------------------------------


class RemoteCore:
    """EngineCore's surface (as AsyncEngine uses it) over a replica's handle. Only the engine
    thread of its AsyncEngine calls it, except `shutdown()`, called once that thread has ended."""

    def __init__(self, handle: RemoteHandle, info: ReplicaInfo, grammar_compiler):
        self.handle = handle
        self.info = info
        self.index = info.index
        self.runtime = info.runtime
        self.grammar_compiler = grammar_compiler  # the API process's (one for all replicas)
        self._snapshot = info.snapshot
        self._died: WorkerDiedError | None = None
        self._closed = False

    @property
    def max_model_len(self) -> int:
        return self.runtime.max_model_len

    def counters(self) -> CoreCounters:
        return self._snapshot.counters

    def _call(self, method: str, *args: object) -> Any:
        if self._died is not None:
            raise WorkerDiedError(str(self._died))
        try:
            return self.handle.call(method, *args)
        except WorkerDiedError as exc:
            self._died = exc
            raise

    def has_unfinished(self) -> bool:
        # After a death, say yes: the engine thread then steps, and step() reports the death.
        return self._snapshot.has_unfinished or self._died is not None

    def add_request(self, request_id, prompt_token_ids, params, cache_salt=None, grammar=None, arrival_time=None) -> None:
        """Raises what EngineCore.add_request raises (ValueError for a bad request), from the replica."""
        spec = grammar.spec if grammar is not None else None
        try:
            self._snapshot = self._call("add_request", request_id, list(prompt_token_ids), params, cache_salt, spec,
                                        arrival_time)
        except WorkerDiedError as exc:
            raise EngineDeadError(f"the engine replica is gone: {exc}") from exc

    def abort_request(self, request_id: str) -> bool:
        found, self._snapshot = self._call("abort_request", request_id)
        return found

    def step(self) -> list:
        outputs, self._snapshot = self._call("step")
        return outputs

    @property
    def alive(self) -> bool:
        """The replica process (or actor) still runs and has not failed a call by dying."""
        return self._died is None and not self._closed and self.handle.alive

    def death(self) -> str | None:
        if self._died is not None:
            return str(self._died)
        return self.handle.death()

    def kill(self) -> None:
        """Stop the replica process now (tests; a replica that must go)."""
        self.handle.kill()

    def shutdown(self) -> None:
        """Stop the replica (its core shuts down there); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("closing %s failed", self.handle.name)
