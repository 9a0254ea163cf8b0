"""SamplingParams: the per-request generation knobs the engine understands (no HTTP, no pydantic).

The server maps OpenAI request fields onto these; `validate()` raises ValueError with a message fit
to show a user, which the server turns into a 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine knobs need no torch at import time
    import torch

MAX_LOGPROBS = 20
MAX_N = 128  # samples per request: each is a sequence in the batch
# Integers the engine turns into int32/int64 tensors or hands to torch: token ids, top_k, lengths.
MAX_INT32 = 2**31 - 1
# A seed is an int64. Sample i of a request draws from seed + i, which stays inside what
# torch.Generator.manual_seed takes ([-2**63, 2**64 - 1]) for every seed in range and i < MAX_N.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
# Past these a seen token is as good as banned (or forced) already; a penalty that float32 rounds
# to 0 would divide logits by zero.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4
# The sampler works in float32: a finite Python float above this would become inf there.
_MAX_FLOAT32 = 3.4028234663852886e38

# Hook for constrained decoding: given the tokens generated so far, return a bool mask over the
# vocabulary (True = allowed) or None for "no constraint this step".
AllowedTokensFn = Callable[[list[int]], "torch.Tensor | None"]


def _show(value: Any) -> str:
    """A value for an error message; a huge integer is described, not spelled out."""
    if isinstance(value, int) and abs(value) > MAX_SEED:
        return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"
    return repr(value)


def _fits_float32(value: float) -> bool:
    try:
        return math.isfinite(value) and abs(value) <= _MAX_FLOAT32
    except OverflowError:  # an int too large for any float
        return False


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the generated text must match; exactly one of the forms is set.

    heron.structured compiles it into a grammar that masks the vocabulary at every step, so the
    output is guaranteed to match (unless max_tokens cuts it short).
    """

    json: dict[str, Any] | str | None = None  # a JSON Schema, as a dict or its JSON text
    json_object: bool = False  # any single JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar, or GBNF / EBNF as llama.cpp writes it
    # JSON Schema only: False ignores keywords the compiler does not implement instead of refusing.
    strict: bool = True

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        forms = [
            name
            for name, value in (
                ("json", self.json is not None),
                ("json_object", self.json_object),
                ("regex", self.regex is not None),
                ("choice", self.choice is not None),
                ("grammar", self.grammar is not None),
            )
            if value
        ]
        if len(forms) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, json_object, regex, choice or grammar; "
                + (f"got {', '.join(forms)}" if forms else "got none")
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")

    def cache_key(self) -> str:
        """The spec as one text, for caching compiled grammars. Keys keep their order: a schema's
        property order is the order the output writes them in, so `{a, b}` and `{b, a}` differ."""
        return json.dumps([self.json, self.json_object, self.regex, self.choice, self.grammar, self.strict])


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; k: the sampled token plus k alternatives
    prompt_logprobs: int | None = None
    allowed_tokens_fn: AllowedTokensFn | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(message: str) -> None:
            raise ValueError(message)

        # Every float must be finite first: NaN fails every comparison, so a bound alone lets it through.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not _fits_float32(value):
                bad(f"{name} must be a finite number, got {_show(value)}")
        if not 1 <= self.n <= MAX_N:
            bad(f"n must be between 1 and {MAX_N}, got {_show(self.n)}")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {_show(self.temperature)}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {_show(self.top_p)}")
        if not 0 <= self.top_k <= MAX_INT32:
            bad(f"top_k must be -1 (off) or an integer from 1 to {MAX_INT32}, got {_show(self.top_k)}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {_show(self.min_p)}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {_show(self.presence_penalty)}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {_show(self.frequency_penalty)}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], "
                f"got {_show(self.repetition_penalty)}"
            )
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            bad(f"seed must be a 64-bit signed integer ({MIN_SEED} to {MAX_SEED}), got {_show(self.seed)}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_INT32:
            bad(f"max_tokens must be between 1 and {MAX_INT32}, got {_show(self.max_tokens)}")
        if not 0 <= self.min_tokens <= MAX_INT32:
            bad(f"min_tokens must be between 0 and {MAX_INT32}, got {_show(self.min_tokens)}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                bad(f"{name} must be between 0 and {MAX_LOGPROBS}, got {_show(value)}")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not isinstance(token_id, int) or not 0 <= token_id <= MAX_INT32:
                    bad(f"logit_bias keys must be token ids (integers from 0 to {MAX_INT32}), got {_show(token_id)}")
                if not -100 <= bias <= 100:  # also refuses NaN
                    bad(f"logit_bias values must be in [-100, 100], got {_show(bias)} for token {token_id}")
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or not 0 <= token_id <= MAX_INT32:
                bad(f"stop_token_ids must be token ids (integers from 0 to {MAX_INT32}), got {_show(token_id)}")

    def child_seed(self, index: int) -> int | None:
        """The seed of sample `index`: each sample has its own stream, so n samples differ yet replay."""
        return None if self.seed is None else self.seed + index

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
