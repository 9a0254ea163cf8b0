"""AsyncEngine: the asyncio face of EngineCore, for the HTTP layer.

It runs the core on one dedicated engine thread (heron.engine.driver, shared with the embedding
engine), the only thread that ever touches the (not thread-safe) core. What flows in: `generate()`
and `abort()` calls on the event loop, handed to the engine thread as commands on the driver's
thread-safe queue and applied between steps. What flows out: every RequestOutput
delta of a request, in order, pushed into that request's asyncio queue with
`loop.call_soon_threadsafe` (one call per event loop per step) and yielded by its `generate()`
iterator; the last one has `finished=True`.

Lifecycle: `start()` starts the thread, `shutdown()` stops it (requests still in flight end with a
final output whose finish reason is ABORT). A consumer that stops iterating (client disconnect,
task cancelled) aborts its request, which frees its KV blocks before the next step. A request the
core could not complete (RequestFailedError on its final output) raises that error from its own
iterator; everything else goes on. An exception out of `core.step()` itself (the core lets only
engine failures out: see heron.engine.core) fails every in-flight request with EngineDeadError and
marks the engine dead: later `generate()` calls raise EngineDeadError at once.

Why a thread and not a process: the core spends most of a step in torch kernels, which release the
GIL, and a thread hands outputs over without pickling or a second copy of the tokenizer. Measured on
the bundled model on 2 CPU cores (8 concurrent greedy streams of 64 tokens, median of 6-15 runs):
no event-loop load, thread 78 tok/s vs a subprocess behind pipes 80; with the loop doing pure-Python
work 9% / 30% of the time, 65 vs 72 and 52 vs 57 tok/s. The process wins a little only when the
loop competes for the GIL, and showed worse tails (runs with 2-3 s token gaps), so not clearly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from heron.engine.core import EngineCore
from heron.engine.driver import EngineDriver, call_in_loop
from heron.engine.errors import EngineDeadError
from heron.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.structured import CompiledGrammar
from heron.structured.pool import LazyCompilePool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every step; readers get it whole, never torn.

    It is published before that step's outputs are delivered, so a caller that has seen a request
    finish reads a snapshot that already counts it.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_requests: int = 0  # requests the engine thread holds, admitted or not
    num_free_kv_blocks: int = 0  # truly free plus cached-but-unreferenced (evictable) blocks
    num_kv_blocks: int = 0
    # Cumulative since start (Prometheus counters): prefix-cache lookups and hits in tokens,
    # preemptions, prompt tokens of requests that produced a token, tokens generated.
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0


class _Aborted:
    """Queue item: the request was aborted by `abort()` or shutdown, not by its own consumer."""


@dataclass
class _Stream:
    """The event-loop side of one request: the queue the engine thread feeds, and what was seen.

    The samples' text and token ids are kept so that an abort can still end the iterator with a
    final output carrying everything produced so far, as a normal finish does.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException | _Aborted] = field(default_factory=asyncio.Queue)
    texts: dict[int, list[str]] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)

    def record(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            self.texts.setdefault(completion.index, []).append(completion.delta_text)
            self.token_ids.setdefault(completion.index, []).extend(completion.delta_token_ids)
            if completion.delta_logprobs is not None:
                self.logprobs.setdefault(completion.index, []).extend(completion.delta_logprobs)

    def aborted_output(self) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=index,
                text="".join(self.texts.get(index, [])),
                token_ids=list(self.token_ids.get(index, [])),
                logprobs=self.logprobs.get(index, []) if self.params.logprobs is not None else None,
                finish_reason=FinishReason.ABORT,
            )
            for index in range(self.params.n)
        ]
        return RequestOutput(self.request_id, self.prompt_token_ids, completions, finished=True)


@dataclass
class _Add:
    stream: _Stream
    cache_salt: str | None
    grammar: CompiledGrammar | None = None
    arrival_time: float | None = None  # time.monotonic() when generate() was called


@dataclass
class _Abort:
    request_id: str
    # Set when the request's own consumer left: abort only that stream, never a later request
    # that reuses the id. None (an explicit abort) aborts whatever request holds the id.
    stream: _Stream | None = None


_Command = _Add | _Abort
# What one engine-thread iteration hands to each event loop: (request queue, item) pairs.
_Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]]


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    """Runs on an event loop: deliver one step's items to their request queues."""
    for request_queue, item in items:
        request_queue.put_nowait(item)


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        *,
        grammar_workers: int = 1,
        grammar_queue: int = 16,
        grammar_timeout: float = 10.0,
    ):
        """grammar_*: the structured-output compile pool (heron.structured.pool): its threads,
        how many specs may wait for one, and how long a request waits for its compile."""
        self.core = core
        self._grammar = LazyCompilePool(lambda: core.grammar_compiler, grammar_workers, grammar_queue, grammar_timeout)
        self._driver: EngineDriver[_Command] = EngineDriver(
            thread_name="heron-engine",
            engine_name="the engine",
            owner="AsyncEngine",
            serve=self._serve,
            fail=self._fail_all,
            refuse=self._refuse,
        )
        self._stats = self._snapshot({})
        # Touched only by the engine thread: request id -> its stream, for admitted requests.
        self._streams: dict[str, _Stream] = {}

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the engine thread (idempotent); EngineDeadError after shutdown."""
        self._driver.start()

    async def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight finish with an ABORT output."""
        self._driver.close()
        self._grammar.close()  # requests waiting for a compile get GrammarPoolClosed
        await self._driver.join()  # the thread may be mid-step
        await self._grammar.join()

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def is_running(self) -> bool:
        """Started, not shut down and not dead."""
        return self._driver.is_running

    @property
    def dead_error(self) -> BaseException | None:
        """The exception that killed the engine loop, if it died."""
        return self._driver.dead_error

    # ----------------------------------------------------------------- stats

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_running(self) -> int:
        return self._stats.num_running

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._stats.kv_cache_usage

    # ----------------------------------------------------------------- requests

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield every RequestOutput delta of one request; the last has `finished=True` and, when
        the engine finished it (not an abort), its timings in `metrics` (arrival = this call).

        A request with structured outputs has its grammar compiled on a worker thread first (or
        passes `grammar` from `compile_grammar`), so the engine thread never waits on a compiler.

        Raises ValueError before yielding anything if the core rejects the request;
        RequestFailedError (heron.engine.errors) in place of the final output if the engine could
        not complete this request (its `status` and `code` say why; other requests carry on); and
        EngineDeadError if the engine is dead or shut down (or dies while this runs). Leaving the
        iteration early (break, cancellation, aclose) aborts the request.
        """
        arrival_time = time.monotonic()
        if params.structured_outputs is not None and grammar is None:
            grammar = await self.compile_grammar(params.structured_outputs)
        stream = _Stream(request_id, list(prompt_token_ids), params, asyncio.get_running_loop())
        self._driver.submit(_Add(stream, cache_salt, grammar, arrival_time))
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True  # rejected or failed: nothing left in the core to abort
                    raise item
                if isinstance(item, _Aborted):
                    done = True
                    yield stream.aborted_output()
                    return
                if item.error is not None:
                    done = True  # the core already ended it and freed its blocks
                    raise item.error
                stream.record(item)
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:
                # The consumer left early (disconnect, cancel): free the request's KV blocks. This
                # must not await, since it may run while a GeneratorExit is unwinding us.
                self._driver.post(_Abort(request_id, stream))

    async def compile_grammar(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Compile a structured-output spec in the engine's bounded compile pool. Raises GrammarError
        (a ValueError: the spec is invalid, over a cap, or too slow to compile) or GrammarUnavailable
        (the pool is full or closed). Cancelling the caller drops a compile that has not started."""
        return await self._grammar.compile(spec)

    async def abort(self, request_id: str) -> None:
        """Abort a request; applied before the next step. Its iterator ends with an ABORT output.
        After shutdown it does nothing: the thread aborts everything itself."""
        self._driver.post(_Abort(request_id))

    # ----------------------------------------------------------------- engine thread

    def _serve(self) -> None:
        core = self.core
        while True:
            # Idle: block until a command comes (no spinning). Busy: take what is there and step.
            commands, stopping = self._driver.take(block=not core.has_unfinished())
            deliveries: _Deliveries = {}
            for command in commands:
                self._apply(command, deliveries)
            if stopping:
                self._abort_all(deliveries)
                self._deliver(deliveries)
                self._stats = self._snapshot(self._streams)
                return
            if core.has_unfinished():
                for output in core.step():
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        del self._streams[output.request_id]
                    deliveries.setdefault(stream.loop, []).append((stream.queue, output))
            # Snapshot first: whoever sees a request finish must not then read stats without it.
            self._stats = self._snapshot(self._streams)
            self._deliver(deliveries)

    def _apply(self, command: _Add | _Abort, deliveries: _Deliveries) -> None:
        if isinstance(command, _Add):
            stream = command.stream
            try:
                self.core.add_request(
                    stream.request_id,
                    stream.prompt_token_ids,
                    stream.params,
                    command.cache_salt,
                    command.grammar,
                    arrival_time=command.arrival_time,
                )
            except Exception as exc:  # bad input (ValueError): it belongs to that caller alone
                deliveries.setdefault(stream.loop, []).append((stream.queue, exc))
                return
            self._streams[stream.request_id] = stream
            return
        stream = self._streams.get(command.request_id)
        if command.stream is not None and stream is not command.stream:
            return  # that request already ended; the id may belong to a newer request now
        self.core.abort_request(command.request_id)
        if stream is not None:
            del self._streams[command.request_id]
            if command.stream is None:  # somebody else aborted it: tell its consumer
                deliveries.setdefault(stream.loop, []).append((stream.queue, _Aborted()))

    def _abort_all(self, deliveries: _Deliveries) -> None:
        for request_id, stream in self._streams.items():
            self.core.abort_request(request_id)
            deliveries.setdefault(stream.loop, []).append((stream.queue, _Aborted()))
        self._streams.clear()

    def _fail_all(self, exc: Exception) -> None:
        """The loop died (the driver has marked the engine dead): fail every request in flight."""
        deliveries: _Deliveries = {}
        for request_id, stream in self._streams.items():
            # One instance per request: an exception raised in several tasks would share a traceback.
            error = EngineDeadError(f"the engine loop failed: {exc!r}")
            error.__cause__ = exc
            deliveries.setdefault(stream.loop, []).append((stream.queue, error))
            try:
                # Best effort, so the KV blocks come back if the core is still usable.
                self.core.abort_request(request_id)
            except Exception:
                logger.exception("could not abort %s in the failed core", request_id)
        self._streams.clear()
        self._deliver(deliveries)
        self._stats = self._snapshot({})

    def _refuse(self, command: _Command, error: EngineDeadError) -> None:
        """After a failure: a request that raced past the dead check gets the error; aborts are moot."""
        if isinstance(command, _Add):
            self._deliver({command.stream.loop: [(command.stream.queue, error)]})

    @staticmethod
    def _deliver(deliveries: _Deliveries) -> None:
        for loop, items in deliveries.items():
            call_in_loop(loop, _put_all, items)

    def _snapshot(self, streams: dict[str, _Stream]) -> EngineStats:
        return EngineStats(num_requests=len(streams), **vars(self.core.counters()))
