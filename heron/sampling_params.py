"""SamplingParams: the per-request generation knobs the engine understands (no HTTP, no pydantic).

The server maps OpenAI request fields onto these; `validate()` raises ValueError with a message fit
to show a user, which the server turns into a 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine knobs need no torch at import time
    import torch

MAX_LOGPROBS = 20

# Hook for constrained decoding: given the tokens generated so far, return a bool mask over the
# vocabulary (True = allowed) or None for "no constraint this step".
AllowedTokensFn = Callable[[list[int]], "torch.Tensor | None"]


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
        """A canonical text of the spec, for caching compiled grammars."""
        return json.dumps(
            [self.json, self.json_object, self.regex, self.choice, self.grammar, self.strict], sort_keys=True
        )


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

        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                bad(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not -100 <= bias <= 100:
                    bad(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
