"""GrammarCompilePool: a fixed set of low-priority compile threads with a bounded queue in front.

In: `await pool.compile(spec, timeout)` from the event loop. Out: a CompiledGrammar, or a typed
error: GrammarError (400, including GrammarLimitError and GrammarTimeoutError) or
GrammarUnavailable (503: GrammarBusyError when the queue is full or the spec waited its whole
timeout for a worker, GrammarPoolClosed at shutdown).

Why a pool of its own rather than `asyncio.to_thread`: the default executor has as many threads as
there are requests, so eight large schemas compile at once and each takes eight times as long,
starving the engine of CPU. Here `num_workers` threads (default 1) compile one spec each, in the
idle scheduling class so they take only CPU the engine leaves idle; the rest wait in a queue of
`max_waiting` specs. Identical specs share one compile. A waiter that is cancelled (its client
left) before its compile starts drops it. A compile that has started cannot be interrupted (llguidance runs it in native
code, GIL released): the caps and llguidance's fuel (heron.structured.limits) bound it instead, and
its result still lands in the compiler's cache, so a retry after a timeout is instant.

Worker threads get a 256 MiB stack: llguidance recurses on the native stack, and a 1,000-level
`$ref` chain overflows the usual 8 MiB; the caps stop specs far shallower than that, and the big
stack makes the margin some 30x wider. The memory is only reserved, not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from heron.sampling_params import StructuredOutputsParams
from heron.structured.compiler import CompiledGrammar, GrammarCompiler
from heron.structured.errors import GrammarBusyError, GrammarPoolClosed, GrammarTimeoutError

logger = logging.getLogger(__name__)

WORKER_STACK_BYTES = 256 * 1024 * 1024
# How long an engine's shutdown waits for a running compile (bounded by the caps: ~1 s at most).
JOIN_TIMEOUT_S = 15.0
_stack_lock = threading.Lock()  # threading.stack_size is process-wide: set it only while starting ours


def _lower_this_threads_priority() -> None:
    """Run the calling thread only on CPU nothing else wants: SCHED_IDLE, else nice 19.

    Linux schedules each thread on its own, so this touches no other thread. On two cores a busy
    nice-19 thread still slowed a 32-token generation by some 7% (median of six runs); a SCHED_IDLE
    one by under 2%: its weight is a fifth of nice 19's and it never preempts a normal thread.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class _Job:
    """One spec's compile, shared by every request that waits for it."""

    def __init__(self, key: str, spec: StructuredOutputsParams, schema: object):
        self.key = key
        self.spec = spec
        self.schema = schema  # what GrammarCompiler.check returned for it
        self.future: Future[CompiledGrammar] = Future()
        self.num_waiters = 0
        self.started = False
        self.dropped = False


class GrammarCompilePool:
    def __init__(self, compiler: GrammarCompiler, num_workers: int = 1, max_waiting: int = 16):
        if num_workers < 1 or max_waiting < 0:
            raise ValueError("a grammar compile pool needs at least one worker and a non-negative queue")
        self.compiler = compiler
        self.max_waiting = max_waiting
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._jobs: dict[str, _Job] = {}  # by spec.cache_key(): queued or running
        self._num_waiting = 0  # jobs queued, not yet started
        self._lock = threading.Lock()
        self._closed = False
        self._threads = []
        with _stack_lock:
            previous = threading.stack_size(WORKER_STACK_BYTES)
            try:
                for i in range(num_workers):
                    thread = threading.Thread(target=self._work, name=f"heron-grammar-compile-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            finally:
                threading.stack_size(previous)

    @property
    def num_waiting(self) -> int:
        """Compiles queued for a worker (not counting the running ones)."""
        return self._num_waiting

    async def compile(self, spec: StructuredOutputsParams, timeout: float) -> CompiledGrammar:
        """The spec's compiled grammar within `timeout` seconds; see the module docstring for errors."""
        if self._closed:
            raise GrammarPoolClosed("The server is shutting down; the grammar was not compiled.")
        # The caps first, on the loop (milliseconds of Python), so that a spec over them never takes
        # a queue slot, and before cache_key(), which could not write a too-deep schema.
        schema = self.compiler.check(spec)
        key = spec.cache_key()
        found = self.compiler.cached(key)
        if found is not None:
            return found
        job = self._join(key, spec, schema)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        job.future.add_done_callback(lambda done: loop.call_soon_threadsafe(_settle, waiter, done))
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            started = self._leave(job)
            if started:
                raise GrammarTimeoutError(
                    f"The grammar did not compile within {timeout:g} s (the server's "
                    "`heron serve --grammar-compile-timeout` raises it); a retry may find it compiled."
                ) from None
            raise GrammarBusyError(
                f"The grammar waited {timeout:g} s for a compile worker; the server is busy compiling others."
            ) from None
        except asyncio.CancelledError:
            self._leave(job)
            raise

    def _join(self, key: str, spec: StructuredOutputsParams, schema: object) -> _Job:
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                if self._num_waiting >= self.max_waiting:
                    raise GrammarBusyError(
                        f"{self._num_waiting} grammars are already waiting to compile (the server's "
                        "`heron serve --max-grammar-queue` raises the limit); retry shortly."
                    )
                job = _Job(key, spec, schema)
                self._jobs[key] = job
                self._num_waiting += 1
                self._queue.put(job)
            job.num_waiters += 1
            return job

    def _leave(self, job: _Job) -> bool:
        """A waiter gives up; a queued job nobody waits for is dropped. Returns whether it had started."""
        with self._lock:
            job.num_waiters -= 1
            if job.num_waiters == 0 and not job.started and not job.dropped:
                job.dropped = True
                self._num_waiting -= 1
                self._jobs.pop(job.key, None)
            return job.started

    def _work(self) -> None:
        _lower_this_threads_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.dropped or self._closed:
                    continue
                job.started = True
                self._num_waiting -= 1
            try:
                result = self.compiler.compile_checked(job.spec, job.schema, job.key)
            except Exception as exc:  # noqa: BLE001 - every error goes to the waiters, typed as raised
                _resolve(job.future, exc=exc)
            else:
                _resolve(job.future, result=result)
            finally:
                with self._lock:
                    if self._jobs.get(job.key) is job:
                        del self._jobs[job.key]

    def close(self) -> None:
        """Stop taking compiles; every waiting request gets GrammarPoolClosed. A running compile
        finishes in its (daemon) thread, unobserved."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._num_waiting = 0
        for job in jobs:
            _resolve(job.future, exc=GrammarPoolClosed("The server is shutting down; the grammar was not compiled."))
        for _ in self._threads:
            self._queue.put(None)


    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker threads to end after close(); True if they did.
        A process must not exit while one is inside llguidance: a daemon thread still running
        native code when the interpreter finalizes crashes it (SIGSEGV instead of exit 0)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


class LazyCompilePool:
    """The compile pool an engine holds: started on its first compile, closed once at shutdown.

    After `close()` (under the same lock that starts the pool) a compile gets GrammarPoolClosed,
    so none can start a pool behind shutdown's back; requests already waiting get it too.
    """

    def __init__(self, compiler: Callable[[], GrammarCompiler], num_workers: int, max_waiting: int, timeout: float):
        """`compiler`: gives the engine's GrammarCompiler (called when the pool starts);
        `timeout`: how long a request waits for its compile."""
        self._compiler = compiler
        self._args = (num_workers, max_waiting)
        self.timeout = timeout
        self._pool: GrammarCompilePool | None = None
        self._closed = False
        self._lock = threading.Lock()

    async def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        with self._lock:
            if self._closed:
                raise GrammarPoolClosed("The server is shutting down; the grammar was not compiled.")
            if self._pool is None:
                self._pool = GrammarCompilePool(self._compiler(), *self._args)
            pool = self._pool
        return await pool.compile(spec, self.timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.close()

    async def join(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """After close(): wait (off the event loop) for a compile still running."""
        pool = self._pool
        if pool is not None and not await asyncio.get_running_loop().run_in_executor(None, pool.join, timeout):
            logger.warning("a grammar compile was still running %g s after shutdown", timeout)


def _resolve(future: Future, result: CompiledGrammar | None = None, exc: BaseException | None = None) -> None:
    # close() may have settled it first.
    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # lost a race with close(), which already answered
        pass


def _settle(waiter: asyncio.Future, done: Future) -> None:
    if waiter.done():  # timed out or cancelled meanwhile
        return
    exc = done.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())
