"""InputBatch: the worker's own copy of every running request, and the step's tensors built from it.

The engine describes each step in heron.engine.messages; `update()` applies one message (drop the
finished, add the new, apply each held request's diff), so the worker never reads an engine object.
Each RequestState holds the request's prompt and the tokens this worker sampled for it, its block
table, its computed count and its seeded torch.Generator (which must survive preemption, so a
seeded request draws the same whether or not it was recomputed).

`prepare()` lays a step out as a ForwardBatch: decodes first (one token each, with context), then
prefill chunks, with cache slots from each block table, and picks the rows that need logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from heron.engine.messages import SchedulerOutput
from heron.sampling_params import SamplingParams
from heron.worker.forward_batch import ForwardBatch


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.num_computed_tokens < self.num_prompt_tokens


@dataclass
class ScheduledChunk:
    """One request's part of a step: its state, where its chunk starts, how many tokens it has, and
    its first row in the batch."""

    state: RequestState
    start: int
    num_tokens: int
    row: int = 0

    @property
    def reaches_end(self) -> bool:
        """The chunk ends the request's known tokens, so the step samples the request's next one."""
        return self.start + self.num_tokens == self.state.num_tokens


@dataclass
class StepLayout:
    batch: ForwardBatch
    chunks: list[ScheduledChunk]  # in batch order
    logits_rows: list[int]  # batch rows that need logits, ascending


class InputBatch:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.states: dict[str, RequestState] = {}

    def update(self, out: SchedulerOutput) -> None:
        """Apply one step's message: the ids that ended, the new requests, the held requests' diffs."""
        for request_id in out.finished_request_ids:
            self.states.pop(request_id, None)
        for new in out.new_requests:
            generator = None
            if new.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(new.seed)
            self.states[new.request_id] = RequestState(
                new.request_id, new.prompt_token_ids, new.sampling_params, generator, list(new.block_ids), new.num_computed_tokens
            )
        for diff in out.cached_requests:
            state = self.states[diff.request_id]
            if diff.resumed:
                state.block_ids = list(diff.new_block_ids)
            else:
                state.block_ids.extend(diff.new_block_ids)
            state.num_computed_tokens = diff.num_computed_tokens

    def prepare(self, num_scheduled_tokens: dict[str, int], kv_caches: list | None) -> StepLayout:
        """The ForwardBatch of the given requests (each advancing by its count of tokens)."""
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for request_id, num_tokens in num_scheduled_tokens.items():
            state = self.states[request_id]
            chunk = ScheduledChunk(state, state.num_computed_tokens, num_tokens)
            (decodes if num_tokens == 1 and chunk.start > 0 else prefills).append(chunk)
        chunks = decodes + prefills
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_rows: list[int] = []
        for chunk in chunks:
            state, start = chunk.state, chunk.start
            end = start + chunk.num_tokens
            chunk.row = len(input_ids)
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            table = state.block_ids
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            # Rows needing logits: the last one when the chunk ends the known tokens, and every row
            # of a chunk that asked for prompt logprobs.
            if state.wants_prompt_logprobs():
                logits_rows.extend(range(chunk.row, chunk.row + chunk.num_tokens))
            elif chunk.reaches_end:
                logits_rows.append(chunk.row + chunk.num_tokens - 1)
        device = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
            query_lens=[c.num_tokens for c in chunks],
            context_lens=[c.start for c in chunks],
            num_decodes=len(decodes),
            block_tables=[c.state.block_ids for c in chunks],
            block_size=bs,
            kv_caches=kv_caches,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        )
        return StepLayout(batch, chunks, logits_rows)
