"""EngineCore: the synchronous engine loop, with no HTTP and no asyncio inside.

`step()` = scheduler.schedule() -> executor (forward, then sampling under the grammar masks the core
computes meanwhile) -> advance grammars -> scheduler.update() -> output processor. The scheduler and
the executor's workers share no objects: each step crosses as heron.engine.messages. Grammar state
stays here: the core computes each structured-output request's mask and advances its matcher by
the token it sampled.

Fault isolation: an exception while running, sampling, advancing the grammar of, detokenizing or
stop-checking one request ends that request alone, with a final output whose `error` is a
RequestFailedError (its samples end ABORT) and its KV blocks freed; the other requests of the step
get exactly the results they would have had (the worker re-runs a failed batch one request at a
time to find the culprit). What is not one request's fault kills the engine instead, by raising
out of `step()`: a scheduler error, running out of memory, or an accelerator error.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from heron.config import CacheConfig, SchedulerConfig
from heron.engine.errors import grammar_failed
from heron.engine.executor import Executor
from heron.engine.kv_cache import KVCache
from heron.engine.messages import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from heron.engine.output_processor import OutputProcessor
from heron.engine.request import Request
from heron.engine.scheduler import Scheduler
from heron.models.loader import LoadedModel
from heron.outputs import RequestMetrics, RequestOutput
from heron.sampling_params import SamplingParams
from heron.structured import CompiledGrammar, GrammarCompiler, GrammarLimits
from heron.structured.bitmask import GrammarBitmask

logger = logging.getLogger(__name__)

# Default KV budget when none is given: enough for a busy CPU server without crowding the weights.
DEFAULT_KV_CACHE_BYTES_CPU = 1 << 30
DEFAULT_KV_CACHE_FRACTION_CUDA = 0.5


@dataclass(frozen=True)
class CoreCounters:
    """The scheduler and KV-cache gauges and the cumulative token counts, read at one moment: what
    AsyncEngine publishes as EngineStats, and what a data-parallel replica sends its proxy."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_kv_blocks: int = 0  # truly free plus cached-but-unreferenced (evictable) blocks
    num_kv_blocks: int = 0
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


@dataclass(frozen=True)
class EngineRuntime:
    """Values found at start-up (never written back into config)."""

    num_kv_blocks: int
    block_size: int
    kv_cache_bytes: int
    max_model_len: int


class EngineCore:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig = CacheConfig(),
        scheduler_config: SchedulerConfig = SchedulerConfig(),
        max_model_len: int | None = None,
        grammar_limits: GrammarLimits = GrammarLimits(),
        executor: Executor | None = None,
    ):
        """`executor`: what runs the steps; default one worker in this process on `loaded`'s model."""
        arch = loaded.arch_config
        if arch is None:
            raise ValueError(f"{loaded.source} is an embedding model; it cannot generate text")
        if executor is None:
            from heron.engine.executor.uniproc import UniprocExecutor

            executor = UniprocExecutor(loaded)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.executor = executor
        model_max = arch.max_position_embeddings
        if max_model_len is not None and max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {model_max}")
        max_model_len = max_model_len or model_max

        per_block = executor.kv_bytes_per_block(cache_config.block_size)
        budget = cache_config.kv_cache_memory_bytes
        if budget is None:
            if loaded.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(loaded.device)
                budget = int(free * DEFAULT_KV_CACHE_FRACTION_CUDA)
            else:
                budget = DEFAULT_KV_CACHE_BYTES_CPU
        num_blocks = budget // per_block
        blocks_per_seq = -(-max_model_len // cache_config.block_size)
        if num_blocks < 1:
            raise ValueError(f"a KV cache budget of {budget} bytes holds no block ({per_block} bytes each)")
        if num_blocks < blocks_per_seq:
            # A sequence longer than the whole cache could never finish: cap the context instead.
            max_model_len = num_blocks * cache_config.block_size
        self.runtime = EngineRuntime(num_blocks, cache_config.block_size, num_blocks * per_block, max_model_len)
        self.kv_cache = KVCache(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache, max_model_len)
        executor.initialize_cache(num_blocks, cache_config.block_size)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler.finish_request)
        self._grammar_compiler = GrammarCompiler(self.tokenizer, arch.vocab_size, self.eos_token_ids, limits=grammar_limits)
        self._grammar_masks: GrammarBitmask | None = None  # made when the first grammar request runs
        self._closed = False

    @property
    def max_model_len(self) -> int:
        return self.runtime.max_model_len

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of requests that produced a first token, since start (metrics)."""
        return self.output_processor.num_prompt_tokens

    @property
    def num_generation_tokens(self) -> int:
        """Tokens sampled since start, over all samples (metrics)."""
        return self.output_processor.num_generation_tokens

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def counters(self) -> CoreCounters:
        scheduler, kv_cache = self.scheduler, self.kv_cache
        return CoreCounters(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_free_kv_blocks=kv_cache.num_free_blocks,
            num_kv_blocks=kv_cache.num_blocks,
            num_prefix_cache_queries=kv_cache.prefix_cache_queries,
            num_prefix_cache_hits=kv_cache.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
        )

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The model's compiler for structured outputs (thread-safe: AsyncEngine compiles off-thread)."""
        return self._grammar_compiler

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """`grammar`: the CompiledGrammar of params.structured_outputs if the caller compiled it off
        this thread already (AsyncEngine does); otherwise it is compiled here. `arrival_time`
        (time.monotonic()): when the caller received the request; default now."""
        if request_id in self.output_processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.loaded.arch_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[0]}")
        # SamplingParams cannot know the vocabulary: ids past it would index outside the logits.
        bad = [t for t in (*(params.logit_bias or ()), *params.stop_token_ids) if t >= vocab]
        if bad:
            field_name = "logit_bias" if bad[0] in (params.logit_bias or ()) else "stop_token_ids"
            raise ValueError(f"{field_name} token ids must be in [0, {vocab}); got {bad[0]}")
        self.scheduler.check_prompt(len(prompt_token_ids))
        if params.structured_outputs is not None and grammar is None:
            grammar = self.grammar_compiler.compile(params.structured_outputs)
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        children = [
            Request(
                request_id if params.n == 1 else f"{request_id}#{index}",
                list(prompt_token_ids),
                params,
                cache_salt=cache_salt,
                arrival_time=metrics.arrival_time,
                seed=params.child_seed(index) if params.seed is not None else None,
                eos_token_ids=self.eos_token_ids,
                grammar=grammar.matcher() if grammar is not None else None,
            )
            for index in range(params.n)
        ]
        self.output_processor.add(request_id, prompt_token_ids, params, children, metrics)
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now. Returns False if it was unknown or done."""
        return self.output_processor.end(request_id)

    def shutdown(self) -> None:
        """Release the executor's workers (and their KV caches) and the grammar-mask thread. Called
        by whoever made the core, once nothing steps it any more (the server, at exit); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown()
        if self._grammar_masks is not None:
            self._grammar_masks.close()

    def step(self) -> list[RequestOutput]:
        if self._closed:
            raise RuntimeError("the engine core has been shut down")
        out = self.scheduler.schedule()
        if not out.num_scheduled_tokens:
            return []
        self.output_processor.mark_scheduled(out.num_scheduled_tokens)
        constrained, pending = self._start_grammar_masks(out)  # computed while the model runs
        self.executor.execute_model(out)
        result = self.executor.sample_tokens(self._wait_grammar_masks(constrained, pending))
        for request_id, error in result.failed.items():
            self.output_processor.fail(request_id, error)
        self._advance_grammars(constrained, result)
        return self.output_processor.process(self.scheduler.update(out, result), result)

    def _start_grammar_masks(self, out: SchedulerOutput) -> tuple[list[Request], Future | None]:
        """The structured-output requests that sample this step, and their pending masks. One whose
        grammar already broke is failed here: it must never decode unconstrained."""
        constrained = []
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[request_id]
            if request.grammar is None or request.num_computed_tokens + num_tokens != request.num_tokens:
                continue
            if request.grammar.is_error():
                self.output_processor.fail(request_id, grammar_failed(request.grammar.get_error()))
                continue
            constrained.append(request)
        if not constrained:
            return [], None
        if self._grammar_masks is None:
            self._grammar_masks = GrammarBitmask(self.loaded.arch_config.vocab_size)
        return constrained, self._grammar_masks.start([request.grammar for request in constrained])

    def _wait_grammar_masks(self, constrained: list[Request], pending: Future | None) -> GrammarOutput | None:
        if pending is None:
            return None
        try:
            return GrammarOutput([request.request_id for request in constrained], self._grammar_masks.wait(pending))
        except Exception as exc:
            # One mask computation covers them all, so which grammar failed is unknown: end every
            # constrained request of the step (whatever the worker samples for them is dropped).
            logger.error("computing the grammar masks of %d requests failed", len(constrained), exc_info=exc)
            for request in constrained:
                self.output_processor.fail(request.request_id, grammar_failed(type(exc).__name__))
            return None

    def _advance_grammars(self, constrained: list[Request], result: ModelRunnerOutput) -> None:
        """Advance each constrained request's matcher by its sampled token, before scheduler.update(),
        whose stop check asks whether the token completed the grammar; fail those it refuses."""
        for request in constrained:
            token_id = result.sampled_token_ids.get(request.request_id)
            if token_id is None or request.is_finished:
                continue
            try:
                accepted = request.grammar.consume_token(token_id) and not request.grammar.is_error()
                error = None if accepted else grammar_failed(request.grammar.get_error() or f"token {token_id} was refused")
            except Exception as exc:
                error = grammar_failed(type(exc).__name__)
                logger.error("request %s: grammar failed", request.request_id, exc_info=exc)
            if error is not None:
                self.output_processor.fail(request.request_id, error)
