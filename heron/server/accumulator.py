"""The events a generation answer is made of, and the one accumulator that folds them.

Engine outputs become events once, per endpoint (`chat_events` in serving_chat.py,
`completion_events` in serving_completions.py): text a choice added (with its token ids and shown
logprobs), the thinking a reasoning parser took out of that text, tool calls it completed, the echo of its prompt, its end, and each prompt's token
counts. A streamed answer renders each event as it comes and feeds it to an `Accumulator`; a
collected answer only feeds the accumulator, then builds its body from it. Usage is computed here
and nowhere else, so the usage chunk of a stream and the usage of a body are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from heron.outputs import TokenLogprob
from heron.server.protocol import CompletionUsage, PromptTokensDetails
from heron.server.protocol.common import CompletionTokensDetails


@dataclass
class Echo:
    """The prompt shown before a completion choice (`echo`), with its logprobs when asked."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class TextDelta:
    """What one choice added: its text (tool-call markup taken out), the generated token ids,
    the logprobs the text shows, and the log-probability of every token it generated."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    logprob_sum: float = 0.0


@dataclass
class ReasoningDelta:
    """Thinking a choice added (what its reasoning parser took out of the text). It comes before
    the TextDelta of the same update, which carries that update's token ids."""

    index: int
    text: str
    num_tokens: int = 0  # of the update's tokens, how many went to the thinking (for usage)


@dataclass
class ToolCalls:
    """Tool calls a choice completed: (call index within the choice, call id, ParsedToolCall)."""

    index: int
    calls: list[tuple[int, str, Any]]


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str
    stop_reason: str | int | None


@dataclass
class PromptDone:
    """One engine request finished: how much of its prompt the cache held, and the prompt's
    logprobs when they were asked for."""

    prompt_index: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Choice:
    index: int
    texts: list[str] = field(default_factory=list)
    reasoning_texts: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprob_sum: float = 0.0
    calls: list[tuple[int, str, Any]] = field(default_factory=list)
    echo: Echo | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_texts)


class Accumulator:
    """Folds the events of one answer. `num_prompt_tokens`: the prompts' tokens, all of them;
    `finish_reasons` (choice index -> finish_reason) is the request log's view, filled as choices
    end."""

    def __init__(self, num_prompt_tokens: int, finish_reasons: dict[int, str] | None = None) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.choices: dict[int, Choice] = {}
        self.finish_reasons = finish_reasons if finish_reasons is not None else {}
        self.prompts: dict[int, PromptDone] = {}

    def choice(self, index: int) -> Choice:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = Choice(index)
        return choice

    def add(self, event: Any) -> None:
        if isinstance(event, TextDelta):
            choice = self.choice(event.index)
            if event.text:
                choice.texts.append(event.text)
            choice.token_ids.extend(event.token_ids)
            choice.logprobs.extend(event.logprobs)
            choice.logprob_sum += event.logprob_sum
        elif isinstance(event, ReasoningDelta):
            choice = self.choice(event.index)
            if event.text:
                choice.reasoning_texts.append(event.text)
            choice.reasoning_tokens += event.num_tokens
        elif isinstance(event, ToolCalls):
            self.choice(event.index).calls.extend(event.calls)
        elif isinstance(event, Echo):
            self.choice(event.index).echo = event
        elif isinstance(event, ChoiceEnd):
            choice = self.choice(event.index)
            choice.finish_reason, choice.stop_reason = event.finish_reason, event.stop_reason
            self.finish_reasons[event.index] = event.finish_reason
        elif isinstance(event, PromptDone):
            self.prompts[event.prompt_index] = event

    @property
    def finished(self) -> bool:
        """Whether any engine request has finished (a usage chunk has something to count)."""
        return bool(self.prompts)

    def usage(self, choices: list[Choice] | None = None) -> CompletionUsage:
        """Every prompt's tokens; the generated tokens of `choices` (default: all of them). While
        the answer runs, the counts so far."""
        prompt_tokens = self.num_prompt_tokens
        cached = sum(p.num_cached_tokens for p in self.prompts.values())
        counted = self.choices.values() if choices is None else choices
        counted = list(counted)
        completion_tokens = sum(len(c.token_ids) for c in counted)
        reasoning_tokens = sum(c.reasoning_tokens for c in counted)
        return CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens) if reasoning_tokens else None,
        )
