"""The step boundary between the engine and its workers: plain, picklable messages, no torch.

The scheduler describes each step with a SchedulerOutput. A request crosses once, in full, the first
time it is scheduled (NewRequestData); after that only what changed crosses (CachedRequestData: the
blocks added to its table and how many of its tokens are computed). A worker keeps its own copy of
each request's tokens, table and random generator, and appends the tokens it samples itself, so
no engine object is shared with it. `finished_request_ids` tells the worker which copies to drop.

The core computes the allowed-token masks of structured outputs (its grammars never leave it) and
hands them over as one packed bitmask (GrammarOutput); the worker answers with a ModelRunnerOutput.
Everything here pickles as long as the SamplingParams do (an `allowed_tokens_fn` callable is the one
field that may not), which is what a multi-process executor needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from heron.engine.errors import RequestFailedError
from heron.outputs import TokenLogprob
from heron.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has not seen: everything it needs to run and sample it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int | None  # of the request's own generator; None draws from the global one
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits: tokens whose K/V are already in the blocks


@dataclass
class CachedRequestData:
    """A request the worker holds: what changed since its last step."""

    request_id: str
    new_block_ids: list[int]  # appended to its block table
    num_computed_tokens: int
    # Back after preemption: its blocks were freed, `new_block_ids` is its whole new table and its
    # tokens (prompt and output so far) are recomputed from `num_computed_tokens`.
    resumed: bool = False


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Request id -> tokens the step computes for it, in schedule order (a decode: 1, a prefill: its chunk).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests that ended since the previous step, whose worker state is to be dropped first.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class GrammarOutput:
    """Allowed tokens of the structured-output requests that sample this step."""

    request_ids: list[str]
    # int32 [len(request_ids), ceil(vocab / 32)], bit j of word w allows token 32 * w + j (a torch tensor).
    bitmask: Any


@dataclass
class PromptLogprobs:
    """Logprobs of the prompt tokens one prefill chunk covered, from prompt position `first_position`
    (position 0 has none: its entry is None)."""

    first_position: int
    logprobs: list[TokenLogprob | None]


@dataclass
class ModelRunnerOutput:
    # request id -> sampled token, for requests whose step reached the end of their known tokens.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    # Requests that failed on their own (the step's others ran without them); nothing was sampled for them.
    failed: dict[str, RequestFailedError] = field(default_factory=dict)

    def merge(self, other: ModelRunnerOutput) -> None:
        self.sampled_token_ids.update(other.sampled_token_ids)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.failed.update(other.failed)
