"""Bare JSON tool calls, for models with no call markup of their own.

The whole reply, after leading whitespace and optionally inside a ```json (or bare ```) fence, is
one of:

    {"name": "get_weather", "arguments": {"city": "Paris"}}        ("parameters" also accepted)
    [{"name": ...}, {"name": ...}]
    {"tool_calls": [{"name": ...}, ...]}                           (items may be OpenAI-shaped)

The first non-whitespace characters decide: `{`, `[` or a fence may be calls, anything else is
plain content. If the JSON turns out not to be calls, the whole reply is content. Text after the
calls (and after the closing fence) is content.
"""

from __future__ import annotations

import re

from heron.parsers import register_tool_parser
from heron.parsers.base import Item, Markup, ToolCall, ToolParser, find_json_end, load_json, skip_space

FENCE = "```"

# An opening fence line: ``` or ```json, then the newline.
_FENCE_OPEN_RE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n", re.I)
# A prefix of that line; while the reply is one, the fence is undecided.
_FENCE_PREFIX_RE = re.compile(r"`{1,3}\Z|```[ \t]*(?:j|js|jso|json)?[ \t]*\Z", re.I)


@register_tool_parser("generic")
class GenericToolParser(ToolParser):
    """A reply that is nothing but a JSON call, a list of calls or {"tool_calls": [...]}."""

    def scan(self, text: str, final: bool) -> list[Item]:
        start = skip_space(text, 0)
        fence = _FENCE_OPEN_RE.match(text, start)
        if fence:
            start = skip_space(text, fence.end())
        elif not final and (start == len(text) or _FENCE_PREFIX_RE.match(text, start)):
            return []
        if start == len(text):
            return [] if not final else [text]
        if text[start] not in "{[":
            return [text]
        end = find_json_end(text, start)
        if end is None:
            return [] if not final else [text]
        calls = self._calls(load_json(text[start:end]))
        if calls is None:
            return [text]
        items: list[Item] = [Markup(text[:start]), *calls]
        if fence:
            close = skip_space(text, end)
            if text.startswith(FENCE, close):
                end = close + len(FENCE)
            elif not final and FENCE.startswith(text[close:]):
                return items  # the closing fence may still come
        items.append(text[end:])
        return items

    def _calls(self, value: object) -> list[ToolCall] | None:
        if isinstance(value, dict) and "tool_calls" in value:
            value = value["tool_calls"]
            if not isinstance(value, list):
                return None
        return self.calls_from_json(value)
