"""The scheduler's view of one sequence: its tokens, how far its KV is computed, and its status.

A Request is engine-internal and mutable; it crosses neither the HTTP boundary nor the step boundary
to the workers (they get heron.engine.messages). A completion with `n > 1` becomes n Requests that
share the prompt's KV blocks through the prefix cache.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any = None
    # Extra key mixed into prefix-cache block hashes (e.g. a cache salt); None for plain text.
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are already in the cache (prefix hits and computed chunks).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first scheduling (usage.cached_tokens).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Prefix-cache hashes of this request's full blocks, extended incrementally by the KV cache.
    block_hashes: list[int] = field(default_factory=list)
    # Seed of the request's own random generator (which lives in the worker); None: the global one.
    seed: int | None = None
    # Tokens that end the request unless ignore_eos (the model's EOS ids).
    eos_token_ids: tuple[int, ...] = ()
    # llguidance matcher of a structured-output request: which tokens may come next.
    grammar: Any = None
    finish_reason: Any = None  # heron.outputs.FinishReason once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
