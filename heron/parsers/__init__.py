"""Tool-call and reasoning parsers: the registry of formats, and picking one from a chat template.

In: a format name (`get_tool_parser`, `get_reasoning_parser`) or a chat template's source
(`detect_tool_parser`, `detect_reasoning_parser`).
Out: a `ToolParser` subclass, which turns generated text into content and tool calls (the shared
machinery is in `base.py`, and each format lives in its own module, registered under its name), or
a `ReasoningParser` subclass (`reasoning.py`), which splits a think block from the content.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from heron.parsers.base import ParsedDelta, ToolCall, ToolParser
from heron.parsers.reasoning import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    detect_reasoning_parser,
)

__all__ = [
    "ParsedDelta",
    "ReasoningParser",
    "ToolCall",
    "ToolParser",
    "detect_reasoning_parser",
    "detect_tool_parser",
    "get_reasoning_parser",
    "get_tool_parser",
    "reasoning_parser_names",
    "register_tool_parser",
    "tool_parser_names",
]

_TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: register a ToolParser subclass under name (which it also sets)."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if name in _TOOL_PARSERS:
            raise ValueError(f"tool parser {name!r} is already registered")
        cls.name = name
        _TOOL_PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser registered under name; ValueError naming the known ones if there is none."""
    try:
        return _TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(tool_parser_names())
        raise ValueError(f"unknown tool parser {name!r}; known parsers: {known}") from None


def tool_parser_names() -> list[str]:
    """The registered format names, sorted."""
    return sorted(_TOOL_PARSERS)


def detect_tool_parser(chat_template_source: str | None) -> str:
    """The format a chat template teaches its model, from the markers the template mentions.

    Templates without tool support get Heron's own `<tool_call>` instruction, hence "hermes".
    """
    source = chat_template_source or ""
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3_json"
    return "hermes"


_REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
}
for _name, _cls in _REASONING_PARSERS.items():
    _cls.name = _name


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser registered under name; ValueError naming the known ones if none."""
    try:
        return _REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(reasoning_parser_names())
        raise ValueError(f"unknown reasoning parser {name!r}; known parsers: {known}, none") from None


def reasoning_parser_names() -> list[str]:
    """The registered reasoning formats, sorted."""
    return sorted(_REASONING_PARSERS)


def _register_formats() -> None:
    # Each format module registers itself through the decorator above, so it is imported last.
    for module in ("generic", "hermes", "llama3_json", "mistral"):
        importlib.import_module(f"{__name__}.{module}")


_register_formats()
