"""Tool-call parsers: the registry of formats, and picking one from a model's chat template.

In: a format name (`get_tool_parser`) or a chat template's source (`detect_tool_parser`).
Out: a `ToolParser` subclass, which turns generated text into content and tool calls; the shared
machinery is in `base.py`, and each format lives in its own module, registered under its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from heron.parsers.base import ParsedDelta, ToolCall, ToolParser

__all__ = [
    "ParsedDelta",
    "ToolCall",
    "ToolParser",
    "detect_tool_parser",
    "get_tool_parser",
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


def _register_formats() -> None:
    # Each format module registers itself through the decorator above, so it is imported last.
    for module in ("generic", "hermes", "llama3_json", "mistral"):
        importlib.import_module(f"{__name__}.{module}")


_register_formats()
