"""EngineCore: the synchronous engine loop, with no HTTP and no asyncio inside.

`step()` = scheduler.schedule() -> runner.execute() -> scheduler.update() -> detokenize, check stop
strings, and emit RequestOutputs. A request with `n > 1` fans out into n child Requests (which share
the prompt's KV blocks through the prefix cache) and fans back into one RequestOutput. Outputs are
deltas: every step reports what each sample added; the final output of a request also carries the
full text, token ids and logprobs of every sample.

Fault isolation: an exception while running, sampling, advancing the grammar of, detokenizing or
stop-checking one request ends that request alone, with a final output whose `error` is a
RequestFailedError (its samples end ABORT) and its KV blocks freed; the other requests of the step
get exactly the results they would have had. A failed batch is re-run one request at a time to
find the culprit (seeded generators are rewound first). What is not one request's fault kills the
engine instead, by raising out of `step()`: a scheduler error, running out of memory, or an
accelerator error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from heron.config import CacheConfig, SchedulerConfig
from heron.engine.detokenizer import Detokenizer
from heron.engine.errors import RequestFailedError, grammar_failed
from heron.engine.kv_cache import KVCache
from heron.engine.request import Request
from heron.engine.scheduler import Scheduler
from heron.models.loader import LoadedModel
from heron.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput, TokenLogprob
from heron.sampling_params import SamplingParams
from heron.structured import CompiledGrammar, GrammarCompiler, GrammarLimits
from heron.worker.model_runner import ModelRunner, ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# Default KV budget when none is given: enough for a busy CPU server without crowding the weights.
DEFAULT_KV_CACHE_BYTES_CPU = 1 << 30
DEFAULT_KV_CACHE_FRACTION_CUDA = 0.5

# Failures of the engine, never of the request that happened to be running: retrying alone won't
# help (a CUDA error leaves the context unusable for every later kernel).
_ENGINE_ERRORS = (MemoryError, torch.OutOfMemoryError, *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()))


@dataclass
class _Sample:
    """One child of a request: its engine Request, detokenizer and accumulated logprobs."""

    request: Request
    detokenizer: Detokenizer
    logprobs: list[TokenLogprob] | None
    last_token_hidden: bool = False  # see CompletionOutput.last_token_hidden


@dataclass
class _Group:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    finished_indices: set[int] = field(default_factory=set)


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
    ):
        arch = loaded.arch_config
        if arch is None:
            raise ValueError(f"{loaded.source} is an embedding model; it cannot generate text")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        model_max = arch.max_position_embeddings
        if max_model_len is not None and max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {model_max}")
        max_model_len = max_model_len or model_max

        per_block = ModelRunner.kv_bytes_per_block(
            arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, cache_config.block_size, loaded.dtype
        )
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
        self.runner = ModelRunner(
            loaded.model,
            arch.num_hidden_layers,
            arch.num_key_value_heads,
            arch.head_dim,
            num_blocks,
            cache_config.block_size,
            loaded.dtype,
            loaded.device,
            self.eos_token_ids,
            arch.vocab_size,
        )
        self._grammar_compiler = GrammarCompiler(self.tokenizer, arch.vocab_size, self.eos_token_ids, limits=grammar_limits)
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[str, int]] = {}
        # Child request id -> its group's timings, until the child is first scheduled (so a step
        # only looks for first schedulings while some request still awaits one).
        self._awaiting_schedule: dict[str, RequestMetrics] = {}
        # Cumulative since start, for metrics: prompt tokens of requests that produced a first
        # token (once per request, whatever n), and every token sampled (all samples).
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @property
    def max_model_len(self) -> int:
        return self.runtime.max_model_len

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        if request_id in self._groups:
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
        samples = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.loaded.device).manual_seed(params.child_seed(index))
            request = Request(
                child_id,
                list(prompt_token_ids),
                child_params,
                cache_salt=cache_salt,
                arrival_time=metrics.arrival_time,
                generator=generator,
                eos_token_ids=self.eos_token_ids,
                grammar=grammar.matcher() if grammar is not None else None,
            )
            detokenizer = Detokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            samples.append(_Sample(request, detokenizer, [] if params.logprobs is not None else None))
        for i, sample in enumerate(samples):
            self.scheduler.add_request(sample.request)
            self._child_to_group[sample.request.request_id] = (request_id, i)
            self._awaiting_schedule[sample.request.request_id] = metrics
        self._groups[request_id] = _Group(
            request_id,
            list(prompt_token_ids),
            params,
            samples,
            metrics,
            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now. Returns False if it was unknown or done."""
        return self._end_group(request_id) is not None

    def _end_group(self, request_id: str) -> _Group | None:
        """Forget a request and finish its samples (ABORT), which frees their KV blocks."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for sample in group.samples:
            self._child_to_group.pop(sample.request.request_id, None)
            self._awaiting_schedule.pop(sample.request.request_id, None)
            self.scheduler.finish_request(sample.request, FinishReason.ABORT)
        return group

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        if self._awaiting_schedule:
            scheduled_at = time.monotonic()
            for s in out.scheduled:
                metrics = self._awaiting_schedule.pop(s.request.request_id, None)
                if metrics is not None and metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = scheduled_at
        # Where each request's chunk starts, before update() advances it: a request recomputed after
        # preemption gets prompt logprobs again for positions it already reported.
        chunk_starts = {s.request.request_id: s.request.num_computed_tokens for s in out.scheduled}
        result, failures = self._execute(out)
        failed: dict[str, RequestOutput] = {}
        for request_id, error in failures.items():
            self._fail(request_id, error, failed)
        for s in out.scheduled:
            request = s.request
            if request.grammar is None or request.is_finished:
                continue
            token_id = result.sampled_token_ids.get(request.request_id)
            if token_id is None:
                continue
            # Before update(): its stop check asks whether this token completed the grammar.
            try:
                accepted = request.grammar.consume_token(token_id) and not request.grammar.is_error()
                error = None if accepted else grammar_failed(request.grammar.get_error() or f"token {token_id} was refused")
            except Exception as exc:
                error = grammar_failed(type(exc).__name__)
                logger.error("request %s: grammar failed", request.request_id, exc_info=exc)
            if error is not None:
                self._fail(request.request_id, error, failed)
        updates = self.scheduler.update(out, result)  # skips the requests failed above (finished)

        touched: dict[str, dict[int, CompletionOutput]] = {}
        for request, token_id in updates:
            located = self._child_to_group.get(request.request_id)
            if located is None:
                continue  # another sample of its request failed this step
            group_id, index = located
            group = self._groups[group_id]
            try:
                if request.request_id in result.prompt_logprobs and group.prompt_logprobs is not None and index == 0:
                    chunk = result.prompt_logprobs[request.request_id]
                    # The chunk covers positions from 0 (its None) when it starts the prompt, else
                    # from the token after its first one (the previous chunk's last row predicted it).
                    start = chunk_starts[request.request_id]
                    first_position = 0 if start == 0 else start + 1
                    group.prompt_logprobs.extend(chunk[max(len(group.prompt_logprobs) - first_position, 0) :])
                if token_id is None:
                    continue
                sample = group.samples[index]
                delta = self._advance(sample, request, token_id, result.logprobs.get(request.request_id))
            except Exception as exc:
                logger.error("request %s failed after sampling", request.request_id, exc_info=exc)
                self._fail(request.request_id, _internal_error(exc), failed)
                continue
            touched.setdefault(group_id, {})[index] = delta

        outputs = []
        now = time.monotonic()
        for group_id, deltas in touched.items():
            if group_id in failed:
                continue
            group = self._groups[group_id]
            self.num_generation_tokens += len(deltas)
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                self.num_prompt_tokens += len(group.prompt_token_ids)
            for index, delta in deltas.items():
                if delta.finish_reason is not None:
                    group.finished_indices.add(index)
            finished = len(group.finished_indices) == len(group.samples)
            if finished:
                # The final output carries every sample in full (and this step's deltas).
                completions = [self._full_output(group, i, deltas.get(i)) for i in range(len(group.samples))]
                group.metrics.finished_time = now
                del self._groups[group_id]
                for sample in group.samples:
                    self._child_to_group.pop(sample.request.request_id, None)
            else:
                completions = [deltas[i] for i in sorted(deltas)]
            first = group.samples[0].request
            # Prompt logprobs go out once complete (a streamed `echo` needs them before the output
            # text), and again on the final output, which carries everything.
            prompt_logprobs = None
            if group.prompt_logprobs is not None and len(group.prompt_logprobs) >= len(group.prompt_token_ids):
                if finished or not group.prompt_logprobs_sent:
                    prompt_logprobs = group.prompt_logprobs
                    group.prompt_logprobs_sent = True
            outputs.append(
                RequestOutput(
                    request_id=group_id,
                    prompt_token_ids=group.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    prompt_logprobs=prompt_logprobs,
                    num_cached_tokens=max(first.num_cached_tokens, 0),
                    metrics=group.metrics if finished else None,
                )
            )
        outputs.extend(failed.values())
        return outputs

    def _execute(self, out: SchedulerOutput) -> tuple[ModelRunnerOutput, dict[str, RequestFailedError]]:
        """Run the step; if it raises, run its requests one at a time and report those that fail alone."""
        # Seeded rows draw from their own generators: rewinding them makes a bystander's retry draw
        # what the failed batch drew (unseeded rows draw afresh, as they would on any other day).
        seeded = [(s.request.generator, s.request.generator.get_state()) for s in out.scheduled if s.request.generator is not None]
        try:
            return self.runner.execute(out), {}
        except _ENGINE_ERRORS:
            raise
        except Exception as exc:
            batch_error = exc
        logger.warning("a step of %d requests failed (%r); running them one at a time", len(out.scheduled), batch_error)
        for generator, state in seeded:
            generator.set_state(state)
        result = ModelRunnerOutput()
        failures: dict[str, RequestFailedError] = {}
        for s in out.scheduled:
            # The same block ids: rewriting the KV slots the batch wrote, with the same tokens, is harmless.
            try:
                alone = self.runner.execute(SchedulerOutput([s]))
            except _ENGINE_ERRORS:
                raise
            except Exception as exc:
                if not isinstance(exc, RequestFailedError):
                    logger.error("request %s failed alone", s.request.request_id, exc_info=exc)
                failures[s.request.request_id] = _internal_error(exc)
                continue
            result.sampled_token_ids.update(alone.sampled_token_ids)
            result.logprobs.update(alone.logprobs)
            result.prompt_logprobs.update(alone.prompt_logprobs)
        # Even when every request fails alone, they are failed and the engine goes on: one HTTP
        # request can carry several engine requests, so "all of them fail" is no proof that the
        # engine is broken, and dying would let one client stop the server. What breaks the engine
        # itself (memory, the accelerator, the scheduler) raises out of the step instead.
        return result, failures

    def _fail(self, child_id: str, error: RequestFailedError, failed: dict[str, RequestOutput]) -> None:
        """End the request that child `child_id` belongs to (all its samples), freeing its blocks, and
        put its final output, carrying `error`, in `failed`."""
        located = self._child_to_group.get(child_id)
        if located is None:
            return  # already failed by another of its samples
        group = self._end_group(located[0])
        group.metrics.finished_time = time.monotonic()
        completions = []
        for index, sample in enumerate(group.samples):
            try:
                text = sample.detokenizer.output_text
            except Exception:  # the detokenizer may be what failed
                text = ""
            completions.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=list(sample.request.output_token_ids),
                    logprobs=sample.logprobs,
                    finish_reason=sample.request.finish_reason,
                    stop_reason=sample.request.stop_reason,
                )
            )
        failed[group.request_id] = RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=True,
            prompt_logprobs=group.prompt_logprobs,
            num_cached_tokens=max(group.samples[0].request.num_cached_tokens, 0),
            metrics=group.metrics,
            error=error,
        )

    def _advance(self, sample: _Sample, request: Request, token_id: int, logprob: TokenLogprob | None) -> CompletionOutput:
        """Detokenize one new token, apply stop strings, and describe what this sample added."""
        params = request.sampling_params
        finished_by_token = (
            request.is_finished
            and request.finish_reason == FinishReason.STOP
            and (token_id in request.eos_token_ids or token_id in params.stop_token_ids)
        )
        # An EOS or stop token ends the text without appearing in it (vLLM and OpenAI alike); a
        # completed grammar ends it on a token that does appear.
        if not finished_by_token or params.include_stop_str_in_output:
            stop_string = sample.detokenizer.update([token_id])
            if stop_string is not None:
                self.scheduler.finish_request(request, FinishReason.STOP)
                # A stop string wins over a length limit reached on the same token.
                request.finish_reason = FinishReason.STOP
                request.stop_reason = stop_string
        if sample.logprobs is not None and logprob is not None:
            sample.logprobs.append(logprob)
        finished = request.is_finished
        sample.last_token_hidden = finished_by_token and not params.include_stop_str_in_output
        return CompletionOutput(
            index=self._child_to_group[request.request_id][1],
            delta_text=sample.detokenizer.get_delta(finished=finished),
            delta_token_ids=[token_id],
            delta_logprobs=[logprob] if logprob is not None else None,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
            last_token_hidden=sample.last_token_hidden,
        )

    def _full_output(self, group: _Group, index: int, delta: CompletionOutput | None) -> CompletionOutput:
        sample = group.samples[index]
        request = sample.request
        base = delta if delta is not None else CompletionOutput(index=index)
        return replace(
            base,
            index=index,
            text=sample.detokenizer.output_text,
            token_ids=list(request.output_token_ids),
            logprobs=sample.logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            last_token_hidden=sample.last_token_hidden,
        )


def _internal_error(exc: Exception) -> RequestFailedError:
    """What a request's own failure tells its caller: a RequestFailedError as raised, else a 500 that
    names the exception type (the traceback goes to the log, not to the client)."""
    if isinstance(exc, RequestFailedError):
        return exc
    return RequestFailedError(f"the engine failed on this request ({type(exc).__name__})")
