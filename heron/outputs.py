"""What the engine hands back: RequestOutput with one CompletionOutput per sample, and embeddings.

These are plain data; the server turns them into OpenAI response shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from heron.engine.errors import RequestFailedError


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled (client gone, timeout, shutdown), or failed: RequestOutput.error says why


@dataclass
class TokenLogprob:
    """One generated (or prompt) token's log-probability and its top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    # The final token (an EOS or stop token) ended the text without appearing in it, so the text
    # has one token less than token_ids (usage counts it; logprobs shown with the text leave it out).
    last_token_hidden: bool = False
    # Streaming: what this update added.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When things happened to one request, on the engine's clock (`time.monotonic()`, seconds).

    Carried by a request's final RequestOutput, so that a caller can observe latencies (queue time =
    `first_scheduled_time - arrival_time`) once, when the request ends. For n > 1 the times are those
    of the earliest sample.
    """

    arrival_time: float  # handed to the engine (AsyncEngine.generate / EngineCore.add_request)
    first_scheduled_time: float | None = None  # first admitted into a batch; None if never
    first_token_time: float | None = None  # first output token of any sample; None if none
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None  # on the final output of an engine-finished request
    # Set on the final output of a request the engine could not complete (its samples end ABORT,
    # carrying what they produced); the other requests of its steps are unaffected.
    error: RequestFailedError | None = None


@dataclass
class EmbeddingOutput:
    request_id: str
    embedding: list[float]
    num_prompt_tokens: int
