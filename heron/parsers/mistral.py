"""Mistral tool calls: a `[TOOL_CALLS]` marker and then the calls, in either of two forms.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]     (v0.3 tokenizer)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}      (v11 and later)

The newer form may carry a call id, `name[CALL_ID]abc123[ARGS]{...}`, which we skip: the server
makes its own ids. Text before a marker is content. A marker followed by neither form is given back
as content and scanning goes on after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from heron.parsers import register_tool_parser
from heron.parsers.base import (
    Item,
    ToolCall,
    ToolParser,
    find_json_end,
    load_json,
    partial_marker_start,
    skip_space,
)

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"

_NAME_RE = re.compile(r'[^\s\[\]{}"]*')
_CALL_ID_RE = re.compile(r"[^\s\[\]]*")

# What follows a marker: its calls (None when it is no valid call) and where it ends.
_Calls = tuple[list[ToolCall] | None, int]


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    """`[TOOL_CALLS][...]` arrays and `[TOOL_CALLS]name[ARGS]{...}` calls."""

    keeps_special_tokens = True

    def scan(self, text: str, final: bool) -> list[Item]:
        items: list[Item] = []
        pos = 0
        while True:
            start = text.find(MARKER, pos)
            if start < 0:
                items.append(text[pos:] if final else text[pos : partial_marker_start(text, pos, MARKER)])
                return items
            items.append(text[pos:start])
            after = start + len(MARKER)
            found = self._calls(text, after, final)
            if found is None:
                return items
            calls, pos = found
            if calls:
                items.extend(calls)
            else:
                # Not a call after all: the markup is content, verbatim.
                items.append(text[start:pos])

    def _calls(self, text: str, pos: int, final: bool) -> _Calls | None:
        """The calls following a marker at text[pos]; None while undecided."""
        start = skip_space(text, pos)
        if start == len(text):
            return (None, len(text)) if final else None
        if text[start] == "[":
            return self._json_value(text, start, final, self.calls_from_json)
        name_end = _NAME_RE.match(text, start).end()
        args = name_end
        may_follow = (ARGS, CALL_ID)
        if text.startswith(CALL_ID, name_end):
            args = _CALL_ID_RE.match(text, name_end + len(CALL_ID)).end()
            may_follow = (ARGS,)
        if text.startswith(ARGS, args) and name_end > start:
            name = text[start:name_end]
            args = skip_space(text, args + len(ARGS))
            if args == len(text):
                return (None, len(text)) if final else None
            if text[args] == "{":
                return self._json_value(text, args, final, lambda value: self._named_call(name, value))
            return None, args
        if not final and any(marker.startswith(text[args:]) for marker in may_follow):
            return None  # the name, or its `[ARGS]`, is still coming
        return None, pos

    def _json_value(
        self, text: str, start: int, final: bool, to_calls: Callable[[Any], list[ToolCall] | None]
    ) -> _Calls | None:
        end = find_json_end(text, start)
        if end is None:
            return (None, len(text)) if final else None  # cut off mid-call: content
        return to_calls(load_json(text[start:end])), end

    def _named_call(self, name: str, arguments: object) -> list[ToolCall] | None:
        call = self.make_call(name, arguments)
        return [call] if call else None
