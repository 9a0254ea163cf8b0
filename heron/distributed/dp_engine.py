"""DataParallelEngine: N engine replicas (processes) behind one API server (--data-parallel-size).

The server sees one engine with AsyncEngine's public surface (start, shutdown, is_running,
dead_error, stats, num_running, num_waiting, kv_cache_usage, generate, compile_grammar, abort).
Inside, each replica is an `AsyncEngine(RemoteCore(...))` (heron.distributed.replica): its own
engine thread, its own request streams, its own death. What this class adds:

- Routing: `generate()` asks the Router (heron.distributed.router) for a replica, counts the request
  in flight there until its iterator ends (that count is the load the router balances), and
  remembers request id -> replica so that `abort()` reaches the right one. Request ids are unique
  across replicas here, as one core makes them unique within itself.
- Structured outputs: one GrammarCompiler and compile pool in this process for all replicas; the
  replicas get the spec and compile it again themselves (a matcher does not cross processes).
- Liveness: a replica is dead once its AsyncEngine died (a WorkerDiedError or engine failure out
  of a step) or its process is gone (noticed even while it idles); the router then never picks it
  again, its in-flight requests have failed with EngineDeadError, and the others go on. The engine
  as a whole is dead (`dead_error`, which makes the server exit non-zero) only when none is left.
- Stats: `stats` sums the replicas' EngineStats; `replica_stats` has them one by one (for
  /health and the per-replica `engine` label in /metrics), with the router's counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields

from heron.distributed.replica import RemoteCore, start_replica
from heron.distributed.router import NoLiveReplicaError, Router
from heron.engine.async_engine import AsyncEngine, EngineStats
from heron.engine.errors import EngineDeadError
from heron.outputs import RequestOutput
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.structured import CompiledGrammar
from heron.structured.pool import LazyCompilePool

logger = logging.getLogger(__name__)

# How long a replica may take to load its model and build its core (seconds); None: no limit.
REPLICA_START_TIMEOUT_S: float | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as /health and /metrics show it."""

    index: int
    alive: bool
    stats: EngineStats
    routed: int  # requests the router sent here
    affinity_routed: int  # ... of which for their prefix
    in_flight: int  # requests routed here whose iterator has not ended
    death: str | None = None  # why it is dead


def _sum_stats(all_stats: list[EngineStats]) -> EngineStats:
    return EngineStats(**{f.name: sum(getattr(s, f.name) for s in all_stats) for f in fields(EngineStats)})


class DataParallelEngine:
    owns_cores = True  # shutdown() stops the replicas too (ModelRegistry must not shut down a core)

    def __init__(
        self,
        cores: list[RemoteCore],
        grammar_compiler,
        *,
        policy: str = "prefix_aware",
        load_bound: int = 4,
        grammar_workers: int = 1,
        grammar_queue: int = 16,
        grammar_timeout: float = 10.0,
    ):
        if not cores:
            raise ValueError("a DataParallelEngine needs at least one replica")
        self.cores = cores
        self.replicas = [AsyncEngine(core) for core in cores]
        self.grammar_compiler = grammar_compiler
        self._grammar = LazyCompilePool(lambda: grammar_compiler, grammar_workers, grammar_queue, grammar_timeout)
        self.router = Router(policy, len(cores), block_size=cores[0].runtime.block_size, load_bound=load_bound)
        self._where: dict[str, int] = {}  # request id -> replica, while its iterator runs
        self._started = False
        self._closed = False
        self._deaths: dict[int, str] = {}
        self._dead_error: EngineDeadError | None = None

    @classmethod
    def launch(cls, loaded, settings) -> DataParallelEngine:
        """Start settings.data_parallel_size replicas of `loaded.source` (in parallel) and wait for
        all; `loaded` (no weights needed) gives the tokenizer for this process's grammar compiler."""
        from heron.server.registry import grammar_limits
        from heron.structured import GrammarCompiler

        handles = []
        try:
            for index in range(settings.data_parallel_size):
                handles.append(start_replica(index, loaded.source, settings))
            cores = []
            compiler = GrammarCompiler(
                loaded.tokenizer, loaded.arch_config.vocab_size, loaded.eos_token_ids, limits=grammar_limits(settings)
            )
            for handle in handles:
                wait_ready = getattr(handle, "wait_ready", None)
                if wait_ready is not None:
                    wait_ready(REPLICA_START_TIMEOUT_S)
                cores.append(RemoteCore(handle, handle.call("describe"), compiler))
        except BaseException:
            for handle in handles:
                handle.kill()
                handle.close(0.0)
            raise
        for core in cores:
            logger.info("engine replica %d: pid %s on %s, %d torch threads, %d KV blocks", core.index, core.info.pid,
                        core.info.device, core.info.torch_threads, core.runtime.num_kv_blocks)
        return cls(
            cores,
            compiler,
            policy=settings.data_parallel_policy,
            load_bound=settings.data_parallel_load_bound,
            grammar_workers=settings.grammar_compile_workers,
            grammar_queue=settings.max_grammar_queue,
            grammar_timeout=settings.grammar_compile_timeout,
        )

    # ----------------------------------------------------------------- what the CLI reads

    @property
    def core(self) -> RemoteCore:
        """Replica 0's core (its `runtime`: each replica's KV cache is the same size)."""
        return self.cores[0]

    @property
    def max_model_len(self) -> int:
        return min(core.max_model_len for core in self.cores)

    @property
    def memory_bytes(self) -> int:
        """Weights and KV cache of every replica, all together."""
        return sum(core.info.weight_bytes + core.runtime.kv_cache_bytes for core in self.cores)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine has been shut down")
        for replica in self.replicas:
            replica.start()
        self._started = True

    async def shutdown(self) -> None:
        """Stop every replica's engine thread (requests in flight end ABORT), then its process."""
        self._closed = True
        self._grammar.close()
        await asyncio.gather(*(replica.shutdown() for replica in self.replicas))
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, core.shutdown) for core in self.cores))
        await self._grammar.join()

    async def __aenter__(self) -> DataParallelEngine:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def replica_alive(self, index: int) -> bool:
        """Whether replica `index` serves: its engine thread runs and its process lives."""
        if index in self._deaths:
            return False
        replica, core = self.replicas[index], self.cores[index]
        if self._closed or not self._started:
            return False
        if replica.is_running and core.alive:
            return True
        why = core.death() or (repr(replica.dead_error) if replica.dead_error is not None else "stopped")
        self._deaths[index] = why
        self.router.mark_dead(index)
        logger.error("engine replica %d is dead (%s); routing around it (%d of %d left)", index, why,
                     self.router.num_replicas - len(self._deaths), self.router.num_replicas)
        return False

    def _check_replicas(self) -> list[int]:
        return [i for i in range(len(self.replicas)) if self.replica_alive(i)]

    @property
    def is_running(self) -> bool:
        """Started, not shut down, and at least one replica serving."""
        return self._started and not self._closed and bool(self._check_replicas())

    @property
    def dead_error(self) -> BaseException | None:
        """Set once every replica is dead (one dead replica is not the engine's death)."""
        if self._dead_error is None and self._started and not self._closed and not self._check_replicas():
            reasons = "; ".join(f"replica {i}: {why}" for i, why in sorted(self._deaths.items()))
            self._dead_error = EngineDeadError(f"every engine replica is dead ({reasons})")
        return self._dead_error

    # ----------------------------------------------------------------- stats

    @property
    def stats(self) -> EngineStats:
        return _sum_stats([replica.stats for replica in self.replicas])

    @property
    def num_running(self) -> int:
        return self.stats.num_running

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.stats.kv_cache_usage

    @property
    def replica_stats(self) -> list[ReplicaStatus]:
        router, loads = self.router, self.router.loads
        statuses = []
        for index, replica in enumerate(self.replicas):
            alive = self.replica_alive(index)
            statuses.append(
                ReplicaStatus(
                    index=index,
                    alive=alive,
                    stats=replica.stats,
                    routed=router.routed[index],
                    affinity_routed=router.affinity_routed[index],
                    in_flight=loads[index],
                    death=None if alive else self._deaths.get(index, "stopped"),
                )
            )
        return statuses

    # ----------------------------------------------------------------- requests

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate on the replica the router picks; the same outputs and errors.
        EngineDeadError when no replica is left, or when this one dies under the request."""
        if self._closed:
            raise EngineDeadError("the engine has been shut down")
        if not self._started:
            raise RuntimeError("DataParallelEngine.start() has not been called")
        if params.structured_outputs is not None and grammar is None:
            grammar = await self.compile_grammar(params.structured_outputs)
        # From here to the replica's generate() nothing awaits: the id check and the load count
        # cannot race another request.
        if request_id in self._where:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_replicas()  # a replica that died while idle must not be picked
        try:
            index = self.router.choose(prompt_token_ids, cache_salt)
        except NoLiveReplicaError:
            raise EngineDeadError("every engine replica is dead") from None
        self.router.started(index)
        self._where[request_id] = index
        outputs = self.replicas[index].generate(prompt_token_ids, params, request_id, cache_salt, grammar)
        try:
            async for output in outputs:
                yield output
        except EngineDeadError:
            self.replica_alive(index)  # let the router know now, not at the next request
            raise
        finally:
            await outputs.aclose()  # an early exit aborts the request in its replica
            self.router.finished(index)
            if self._where.get(request_id) == index:
                del self._where[request_id]

    async def compile_grammar(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """As AsyncEngine.compile_grammar, in this process's one pool (for every replica)."""
        return await self._grammar.compile(spec)

    async def abort(self, request_id: str) -> None:
        """Abort a request on whichever replica holds it (unknown ids: nothing happens)."""
        index = self._where.get(request_id)
        if index is not None:
            await self.replicas[index].abort(request_id)
