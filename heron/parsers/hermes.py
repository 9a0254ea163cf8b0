"""Hermes-style tool calls (Hermes 2/3, Qwen2.5, Qwen3, SmolLM2): JSON inside `<tool_call>` tags.

    Sure!<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A reply may hold several blocks, with content before, between and after them. Inside a block we
also accept a JSON list of call objects, which is how SmolLM2 was trained. Heron's fallback
tool prompt (for chat templates without tool support) asks for this format too.
"""

from __future__ import annotations

from heron.parsers import register_tool_parser
from heron.parsers.base import (
    Item,
    ToolCall,
    ToolParser,
    find_json_end,
    in_json_string,
    load_json,
    partial_marker_start,
    skip_space,
)

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

# What a block turned out to be: its calls (None when it is no valid call) and where it ends.
_Block = tuple[list[ToolCall] | None, int]


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    """`<tool_call>{...}</tool_call>` blocks anywhere in the reply."""

    def scan(self, text: str, final: bool) -> list[Item]:
        items: list[Item] = []
        pos = 0
        while True:
            start = text.find(OPEN, pos)
            if start < 0:
                items.append(text[pos:] if final else text[pos : partial_marker_start(text, pos, OPEN)])
                return items
            items.append(text[pos:start])
            block = self._block(text, start + len(OPEN), final)
            if block is None:
                return items
            calls, pos = block
            if calls:
                items.extend(calls)
            else:
                items.append(text[start:pos])

    def _block(self, text: str, body: int, final: bool) -> _Block | None:
        """The block whose body starts at text[body]; None while undecided."""
        start = skip_space(text, body)
        search_from = body
        if start < len(text) and text[start] in "{[":
            end = find_json_end(text, start)
            if end is None:
                # The JSON is not closed yet: a closing tag outside its strings means it never will.
                close = text.find(CLOSE, start)
                while close >= 0 and in_json_string(text, start, close):
                    close = text.find(CLOSE, close + 1)
                if close >= 0:
                    return None, close + len(CLOSE)
                return (None, len(text)) if final else None
            after = skip_space(text, end)
            if text.startswith(CLOSE, after):
                return self.calls_from_json(load_json(text[start:end])), after + len(CLOSE)
            if CLOSE.startswith(text[after:]):
                # Stopped (EOS, or max_tokens inside the closing tag) after a complete JSON value.
                return (self.calls_from_json(load_json(text[start:end])), len(text)) if final else None
            search_from = end  # the tag may also appear inside the JSON's strings
        elif start == len(text) and not final:
            return None
        # Not a call: the block is content up to its closing tag.
        close = text.find(CLOSE, search_from)
        if close >= 0:
            return None, close + len(CLOSE)
        return (None, len(text)) if final else None
