"""OutputProcessor: from the tokens a step produced to the RequestOutputs callers see.

It owns each request's group of samples (`n > 1` fans out into n child Requests) and, per sample,
its incremental detokenizer and logprobs. After every step it detokenizes each new token, applies
stop strings (ending the sample through the scheduler), stitches prompt logprobs chunk by chunk,
fans the samples back into one RequestOutput per request, and keeps the request timings. Outputs
are deltas: every step reports what each sample added; the final output of a request also carries
the full text, token ids and logprobs of every sample. A failed request gets one final output that
carries its RequestFailedError, with its samples ended ABORT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from heron.engine.detokenizer import Detokenizer
from heron.engine.errors import RequestFailedError, as_request_error
from heron.engine.messages import ModelRunnerOutput
from heron.engine.request import Request
from heron.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput, TokenLogprob
from heron.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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


class OutputProcessor:
    def __init__(self, tokenizer, finish_request: Callable[[Request, FinishReason], None]):
        self.tokenizer = tokenizer
        self._finish_request = finish_request  # the scheduler's: ends a sample and frees its blocks
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[str, int]] = {}
        # Child request id -> its group's timings, until the child is first scheduled (so a step
        # only looks for first schedulings while some request still awaits one).
        self._awaiting_schedule: dict[str, RequestMetrics] = {}
        # Failed this step, reported with the step's outputs.
        self._failed: dict[str, RequestOutput] = {}
        # Cumulative since start, for metrics: prompt tokens of requests that produced a first
        # token (once per request, whatever n), and every token sampled (all samples).
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, children: list[Request], metrics: RequestMetrics) -> None:
        """Follow a request whose children the caller hands the scheduler."""
        samples = []
        for index, child in enumerate(children):
            detokenizer = Detokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            samples.append(_Sample(child, detokenizer, [] if params.logprobs is not None else None))
            self._child_to_group[child.request_id] = (request_id, index)
            self._awaiting_schedule[child.request_id] = metrics
        self._groups[request_id] = _Group(
            request_id,
            list(prompt_token_ids),
            params,
            samples,
            metrics,
            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        )

    def mark_scheduled(self, child_ids) -> None:
        if not self._awaiting_schedule:
            return
        scheduled_at = time.monotonic()
        for child_id in child_ids:
            metrics = self._awaiting_schedule.pop(child_id, None)
            if metrics is not None and metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = scheduled_at

    def end(self, request_id: str) -> bool:
        """Forget a request and finish its samples (ABORT), which frees their KV blocks."""
        return self._end_group(request_id) is not None

    def _end_group(self, request_id: str) -> _Group | None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for sample in group.samples:
            self._child_to_group.pop(sample.request.request_id, None)
            self._awaiting_schedule.pop(sample.request.request_id, None)
            self._finish_request(sample.request, FinishReason.ABORT)
        return group

    def fail(self, child_id: str, error: RequestFailedError) -> None:
        """End the request that child `child_id` belongs to (all its samples), freeing its blocks; its
        final output, carrying `error`, goes out with this step's outputs."""
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
        self._failed[group.request_id] = RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=True,
            prompt_logprobs=group.prompt_logprobs,
            num_cached_tokens=max(group.samples[0].request.num_cached_tokens, 0),
            metrics=group.metrics,
            error=error,
        )

    def process(self, updates: list[tuple[Request, int | None]], result: ModelRunnerOutput) -> list[RequestOutput]:
        """The step's outputs, from the scheduler's updates (request, new token or None) and the
        worker's result, plus the final outputs of requests that failed during the step."""
        touched: dict[str, dict[int, CompletionOutput]] = {}
        for request, token_id in updates:
            located = self._child_to_group.get(request.request_id)
            if located is None:
                continue  # another sample of its request failed this step
            group_id, index = located
            group = self._groups[group_id]
            try:
                chunk = result.prompt_logprobs.get(request.request_id)
                if chunk is not None and group.prompt_logprobs is not None and index == 0:
                    # A request recomputed after preemption reports positions it already did: skip those.
                    skip = max(len(group.prompt_logprobs) - chunk.first_position, 0)
                    group.prompt_logprobs.extend(chunk.logprobs[skip:])
                if token_id is None:
                    continue
                delta = self._advance(group.samples[index], index, token_id, result.logprobs.get(request.request_id))
            except Exception as exc:
                logger.error("request %s failed after sampling", request.request_id, exc_info=exc)
                self.fail(request.request_id, as_request_error(exc))
                continue
            touched.setdefault(group_id, {})[index] = delta

        outputs = []
        now = time.monotonic()
        for group_id, deltas in touched.items():
            group = self._groups.get(group_id)
            if group is None:
                continue  # failed after one of its samples advanced
            outputs.append(self._group_output(group, deltas, now))
        outputs.extend(self._failed.values())
        self._failed = {}
        return outputs

    def _group_output(self, group: _Group, deltas: dict[int, CompletionOutput], now: float) -> RequestOutput:
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
            del self._groups[group.request_id]
            for sample in group.samples:
                self._child_to_group.pop(sample.request.request_id, None)
        else:
            completions = [deltas[i] for i in sorted(deltas)]
        # Prompt logprobs go out once complete (a streamed `echo` needs them before the output
        # text), and again on the final output, which carries everything.
        prompt_logprobs = None
        if group.prompt_logprobs is not None and len(group.prompt_logprobs) >= len(group.prompt_token_ids):
            if finished or not group.prompt_logprobs_sent:
                prompt_logprobs = group.prompt_logprobs
                group.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=max(group.samples[0].request.num_cached_tokens, 0),
            metrics=group.metrics if finished else None,
        )

    def _advance(self, sample: _Sample, index: int, token_id: int, logprob: TokenLogprob | None) -> CompletionOutput:
        """Detokenize one new token, apply stop strings, and describe what this sample added."""
        request = sample.request
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
                self._finish_request(request, FinishReason.STOP)
                # A stop string wins over a length limit reached on the same token.
                request.finish_reason = FinishReason.STOP
                request.stop_reason = stop_string
        if sample.logprobs is not None and logprob is not None:
            sample.logprobs.append(logprob)
        finished = request.is_finished
        sample.last_token_hidden = finished_by_token and not params.include_stop_str_in_output
        return CompletionOutput(
            index=index,
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
