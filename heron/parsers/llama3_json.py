"""Llama 3.1 / 3.2 JSON tool calls: the reply itself is the call.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

After optional whitespace and an optional `<|python_tag|>`, one or more JSON objects separated by
`;` and/or whitespace. A reply whose first non-whitespace text is neither `{` nor the tag is plain
content. Once calls have started, an object that is not a valid call is given back as content and
the next one is still tried; the first text that is not an object ends the calls, the rest is
content.
"""

from __future__ import annotations

import re

from heron.parsers import register_tool_parser
from heron.parsers.base import Item, Markup, ToolParser, find_json_end, load_json, skip_space

PYTHON_TAG = "<|python_tag|>"

_SEPARATORS_RE = re.compile(r"[\s;]*")


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """`{"name", "parameters"}` objects making up the whole reply."""

    keeps_special_tokens = True

    def scan(self, text: str, final: bool) -> list[Item]:
        start = skip_space(text, 0)
        rest = text[start:]
        if rest.startswith(PYTHON_TAG):
            pos = start + len(PYTHON_TAG)
        elif rest.startswith("{"):
            pos = start
        elif not final and PYTHON_TAG.startswith(rest):
            return []  # only whitespace, or part of the tag, so far
        else:
            return [text]
        # The leading whitespace and tag go with the first object: dropped if it is a call.
        items: list[Item] = []
        markup_start = 0
        while True:
            pos = _SEPARATORS_RE.match(text, pos).end()
            items.append(Markup(text[markup_start:pos]))
            if pos == len(text):
                return items
            if text[pos] != "{":
                items.append(text[pos:])
                return items
            end = find_json_end(text, pos)
            if end is None:
                if final:
                    items.append(text[pos:])  # cut off mid-call: the partial text is content
                return items
            items.append(self.call_from_json(load_json(text[pos:end])) or text[pos:end])
            markup_start = pos = end
