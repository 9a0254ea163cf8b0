"""Scheduler: continuous batching on token counts, with chunked prefill and preemption.

Each step every running request advances by some number of tokens (one for a decode, a chunk for a
prefill) under `max_num_batched_tokens` and `max_num_seqs`, so prefill chunks and decodes share one
batch. Running requests are served first, oldest first; waiting requests are admitted while budget,
sequence slots and KV blocks last, after a prefix-cache lookup. When blocks run out for a running
request, the newest running request is preempted: its blocks are freed and it is recomputed later
(its prompt plus the tokens it already produced), which the prefix cache usually makes cheap.

Each step is described to the workers as a heron.engine.messages.SchedulerOutput: a request in full
the first time it runs, then only its new blocks and computed count, and the ids that ended since.
Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque

from heron.config import SchedulerConfig
from heron.engine.kv_cache import KVCache
from heron.engine.messages import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from heron.engine.request import Request, RequestStatus
from heron.outputs import FinishReason


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCache, max_model_len: int):
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # What the workers hold: request id -> how many of its block ids they were sent (0 after a
        # preemption, until it runs again); and the held requests that ended since the last step.
        self._sent_blocks: dict[str, int] = {}
        self._finished_ids: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raise ValueError for a prompt that could never produce a token."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt must contain at least one token")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, but the model's context length is {self.max_model_len}"
            )

    def add_request(self, request: Request) -> None:
        self.check_prompt(request.num_prompt_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request: Request, reason: FinishReason) -> None:
        """End a request (any state) and give its blocks back at once."""
        if request.status == RequestStatus.FINISHED:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv_cache.free(request)
        self.requests.pop(request.request_id, None)
        if self._sent_blocks.pop(request.request_id, None) is not None:
            self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        if request.request_id in self._sent_blocks:
            self._sent_blocks[request.request_id] = 0

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        return min(request.num_tokens - request.num_computed_tokens, budget)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        scheduled: list[tuple[Request, int, bool]] = []  # (request, tokens, admitted this step)
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            while self.kv_cache.allocate_slots(request, num_new) is None:
                # Out of blocks: recompute the newest request later (possibly this one).
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    num_new = 0
                    break
            if num_new == 0:
                break
            scheduled.append((request, num_new, False))
            budget -= num_new
            i += 1

        # Admit waiting requests only when nothing was preempted this step (avoids thrashing).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            use_cache = request.sampling_params is None or request.sampling_params.prompt_logprobs is None
            computed_blocks, num_hit = self.kv_cache.get_computed_blocks(request) if use_cache else ([], 0)
            num_new = min(request.num_tokens - num_hit, budget)
            if self.kv_cache.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new, True))
            budget -= num_new

        for request, num_new, admitted in scheduled:
            self._describe(out, request, num_new, admitted)
        if scheduled:
            # Only a step that runs carries them: an empty one never reaches the workers.
            out.finished_request_ids, self._finished_ids = self._finished_ids, []
        return out

    def _describe(self, out: SchedulerOutput, request: Request, num_new: int, admitted: bool) -> None:
        """Add one scheduled request to the step's message: in full if the workers lack it, else its diff."""
        request_id = request.request_id
        num_sent = self._sent_blocks.get(request_id)
        if num_sent is None:
            block_ids = self.kv_cache.get_block_ids(request_id)
            out.new_requests.append(
                NewRequestData(
                    request_id,
                    request.prompt_token_ids,
                    request.sampling_params,
                    request.seed,
                    block_ids,
                    request.num_computed_tokens,
                )
            )
        else:
            block_ids = self.kv_cache.get_block_ids(request_id, num_sent)
            out.cached_requests.append(CachedRequestData(request_id, block_ids, request.num_computed_tokens, resumed=admitted))
        self._sent_blocks[request_id] = (num_sent or 0) + len(block_ids)
        out.num_scheduled_tokens[request_id] = num_new

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, int | None]]:
        """Advance computed counts, append sampled tokens, finish on EOS / stop token / length.

        Returns (request, new token or None) for every scheduled request, in schedule order.
        """
        updates: list[tuple[Request, int | None]] = []
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # ended while the step ran (aborted, failed)
            request.num_computed_tokens += num_tokens
            token_id = result.sampled_token_ids.get(request.request_id)
            if token_id is not None:
                request.append_output_token(token_id)
                reason = self._check_stop(request, token_id)
                if reason is not None:
                    # As in vLLM: the id of a stop token the caller asked for; None for EOS and length.
                    stopped_by_caller = token_id in request.sampling_params.stop_token_ids
                    request.stop_reason = token_id if reason == FinishReason.STOP and stopped_by_caller else None
                    self.finish_request(request, reason)
            updates.append((request, token_id))
        return updates

    def _check_stop(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        if request.grammar is not None and request.grammar.is_stopped():
            # The grammar is complete: nothing more may follow, whatever min_tokens or ignore_eos say.
            return FinishReason.STOP
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
