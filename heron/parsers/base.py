"""The machinery every tool-call parser shares: the streaming driver and the JSON helpers.

In: generated text, in pieces split anywhere (`ToolParser.feed`), then `finish()` at the end.
Out: `ParsedDelta`s, i.e. new assistant content and the tool calls completed by that piece.

A format subclass writes one pure method, `scan(text, final)`, which splits the whole text seen so
far into an ordered list of decided items: content (`str`), `Markup` (separator text that is
dropped when it touches a call and kept as content otherwise) and `ToolCall`s. Whatever might still
turn into a call is left out of the list (the undecided tail). The driver re-scans after every
piece and emits only what is new, so a format gets chunk safety for free as long as its scan never
changes an item it has already decided. The driver also drops whitespace runs that touch a call
and holds back trailing whitespace until it knows whether a call follows it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    """One complete, validated call."""

    name: str
    arguments: str  # the arguments object as JSON text: json.dumps(obj, ensure_ascii=False)


@dataclass
class ParsedDelta:
    """What one `feed()` or `finish()` adds to the reply."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class Markup(str):
    """Format text around calls (a python tag, a `;`, a code fence): dropped next to a call."""


Item = str | ToolCall

# A JSON string (possessive, so an unterminated one fails in linear time), a lone quote (only
# reached when the string is unterminated), or a bracket.
_JSON_TOKEN_RE = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|"|[\[\]{}]', re.S)
_NOT_SPACE_RE = re.compile(r"\S")


def skip_space(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after pos (len(text) if none)."""
    match = _NOT_SPACE_RE.search(text, pos)
    return match.start() if match else len(text)


def find_json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at text[start] ends, or None if it is not closed yet.

    Only brackets outside strings are counted; whether the value is valid JSON is left to the
    decoder, this just says where to cut.
    """
    depth = 0
    for match in _JSON_TOKEN_RE.finditer(text, start):
        token = match.group()
        if token == '"':
            return None
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def in_json_string(text: str, start: int, stop: int) -> bool:
    """Whether text[stop] lies inside a string of the JSON value opening at text[start]."""
    for match in _JSON_TOKEN_RE.finditer(text, start, stop):
        if match.group() == '"':
            return True
    return False


def load_json(text: str) -> Any:
    """The decoded value, or None when text is not JSON (a JSON null is no call either)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def partial_marker_start(text: str, pos: int, marker: str) -> int:
    """Where a proper prefix of marker ending text begins (len(text) if text ends in none).

    That tail may still grow into the marker, so it must not be emitted yet.
    """
    for size in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if marker.startswith(text[len(text) - size :]):
            return len(text) - size
    return len(text)


class ToolParser:
    """Streaming tool-call parser for one reply; subclasses implement `scan` for their format."""

    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False  # the format's markers are special tokens to keep

    def __init__(self, tool_names: Collection[str] | None = None):
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self._chunks: list[str] = []
        self._num_content_chars = 0
        self._num_calls = 0
        self._finished = False

    def scan(self, text: str, final: bool) -> list[Item]:
        """Split text into decided items, leaving out the undecided tail (nothing is when final)."""
        raise NotImplementedError

    def feed(self, text: str) -> ParsedDelta:
        """The next piece of generated text, split anywhere."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._chunks.append(text)
        return self._advance(final=False)

    def finish(self) -> ParsedDelta:
        """Generation ended: decide and flush everything held back."""
        self._finished = True
        return self._advance(final=True)

    @classmethod
    def parse(cls, text: str, tool_names: Collection[str] | None = None) -> tuple[str, list[ToolCall]]:
        """A whole reply at once: (content, calls)."""
        parser = cls(tool_names)
        first, last = parser.feed(text), parser.finish()
        return first.content + last.content, first.tool_calls + last.tool_calls

    # ------------------------------------------------------------------------------ helpers

    def call_from_json(self, value: Any) -> ToolCall | None:
        """A call from a decoded `{"name", "arguments"|"parameters"}` object, None if not valid."""
        if not isinstance(value, dict):
            return None
        if "name" not in value and isinstance(value.get("function"), dict):
            value = value["function"]  # the OpenAI shape: {"type": "function", "function": {...}}
        name = value.get("name")
        if not isinstance(name, str):
            return None
        arguments = value.get("arguments", value.get("parameters"))
        return self.make_call(name, {} if arguments is None else arguments)

    def calls_from_json(self, value: Any) -> list[ToolCall] | None:
        """Calls from one call object or a non-empty list of them; None unless all are valid."""
        calls = []
        for item in value if isinstance(value, list) else [value]:
            call = self.call_from_json(item)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def make_call(self, name: str, arguments: Any) -> ToolCall | None:
        """A call to an offered tool; arguments are an object or JSON text of one, else no call."""
        if isinstance(arguments, str):
            arguments = load_json(arguments)
        if not isinstance(arguments, dict):
            return None
        if self.tool_names is not None and name not in self.tool_names:
            return None
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))

    # ------------------------------------------------------------------------------ driver

    def _advance(self, final: bool) -> ParsedDelta:
        content, calls = _render(self.scan("".join(self._chunks), final), final)
        delta = ParsedDelta(content[self._num_content_chars :], calls[self._num_calls :])
        self._num_content_chars, self._num_calls = len(content), len(calls)
        return delta


def _render(items: list[Item], final: bool) -> tuple[str, list[ToolCall]]:
    """Content and calls from scanned items, dropping what touches a call.

    When not final, the last item is followed by undecided text, which may turn out to be a call:
    its trailing whitespace (or the whole of it, for Markup) is held back.
    """
    merged: list[Item] = []
    for item in items:
        if item == "":
            continue
        if type(item) is str and merged and type(merged[-1]) is str:
            merged[-1] += item  # so a whitespace run split over two items is stripped as one
        else:
            merged.append(item)
    pieces: list[str] = []
    calls: list[ToolCall] = []
    for index, item in enumerate(merged):
        if isinstance(item, ToolCall):
            calls.append(item)
            continue
        after_call = index > 0 and isinstance(merged[index - 1], ToolCall)
        is_last = index == len(merged) - 1
        before_call = not is_last and isinstance(merged[index + 1], ToolCall)
        held = is_last and not final
        if isinstance(item, Markup):
            if not (after_call or before_call or held):
                pieces.append(str(item))
            continue
        if after_call:
            item = item.lstrip()
        if before_call or held:
            item = item.rstrip()
        pieces.append(item)
    return "".join(pieces), calls
