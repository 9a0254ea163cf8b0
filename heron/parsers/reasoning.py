"""Reasoning parsers: the think block a model writes before its answer, split from the answer.

In: generated text, in pieces split anywhere (`ReasoningParser.feed(delta, final)`), and whether
the rendered prompt already opened the block (templates that end the prompt with `<think>\n`).
Out: `(reasoning_delta, content_delta)` per piece. A piece that ends with part of a tag (`<thi`,
`</thin`) is held back until the next piece decides it, so any split of the text gives the same
reasoning and content as feeding it whole.

Formats (both use `<think>` ... `</think>`):
- `qwen3`: the block counts only when the output opens with it (whitespace aside) or the prompt
  opened it; without one everything is content (Qwen3 with `enable_thinking: false` writes an empty
  block or none).
- `deepseek_r1`: the output starts inside the block whether or not it writes the opening tag;
  everything before `</think>` is reasoning.

The reasoning loses the newlines around it, the content the whitespace that follows `</think>`
(what the templates write there), so the answer reads as the model meant it.
"""

from __future__ import annotations

from typing import ClassVar

_START, _THINK, _AFTER, _CONTENT = "start", "think", "after", "content"


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that is a proper start of tag (0 if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningParser:
    """One per choice. `prompt_opened`: the prompt ends inside the block (its text starts as
    reasoning); `prompt_closed`: the prompt ends right after a closed block (all content).
    `implicit_start=False` turns off deepseek_r1's tagless start (an output a grammar shapes)."""

    name: ClassVar[str] = ""
    open_tag: ClassVar[str] = "<think>"
    close_tag: ClassVar[str] = "</think>"
    # Whether an output that does not open with the tag still starts inside the block.
    starts_inside: ClassVar[bool] = False

    def __init__(self, prompt_opened: bool = False, prompt_closed: bool = False, implicit_start: bool = True) -> None:
        self._implicit = self.starts_inside and implicit_start
        self._state = _THINK if prompt_opened else _CONTENT if prompt_closed else _START
        self._held = ""  # undecided text: a partial tag, or the start before it is known
        self._newlines = ""  # newlines at the reasoning's end so far, dropped if the block closes after them
        self._reasoning_started = False
        self._content_started = False
        self.reasoning = ""
        self.content = ""

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside the block."""
        return self._state == _THINK

    @classmethod
    def prompt_state(cls, prompt: str) -> dict[str, bool]:
        """Keyword arguments for a choice of this rendered prompt."""
        tail = prompt.rstrip()
        if tail.endswith(cls.open_tag):
            return {"prompt_opened": True}
        if tail.endswith(cls.close_tag):
            return {"prompt_closed": True}
        return {}

    def _reason(self, text: str, closing: bool, out: list[str]) -> None:
        text = self._newlines + text
        self._newlines = ""
        if not self._reasoning_started:
            text = text.lstrip("\n")
        kept = text.rstrip("\n")
        if not closing:
            self._newlines = text[len(kept):]
        if kept:
            self._reasoning_started = True
            out.append(kept)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(new reasoning, new content) once `delta` is added; `final` flushes what was held."""
        buf = self._held + delta
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state = self._state
            if state == _START:
                rest = buf.lstrip()
                if rest.startswith(self.open_tag):
                    buf, self._state = rest[len(self.open_tag):], _THINK
                    continue
                if not final and self.open_tag.startswith(rest):
                    self._held = buf  # nothing yet, whitespace, or a partial opening tag
                    break
                self._state = _THINK if self._implicit else _CONTENT
                continue
            if state == _THINK:
                end = buf.find(self.close_tag)
                if end >= 0:
                    self._reason(buf[:end], True, reasoning)
                    buf, self._state = buf[end + len(self.close_tag):], _AFTER
                    continue
                if final:
                    self._reason(buf, True, reasoning)
                    break
                keep = _partial_suffix(buf, self.close_tag)
                self._reason(buf[: len(buf) - keep], False, reasoning)
                self._held = buf[len(buf) - keep:]
                break
            if state == _AFTER and not self._content_started:
                buf = buf.lstrip()
                self._content_started = bool(buf)
            if buf:
                content.append(buf)
            break
        if final:
            self._newlines = ""
        out = "".join(reasoning), "".join(content)
        self.reasoning += out[0]
        self.content += out[1]
        return out


class Qwen3ReasoningParser(ReasoningParser):
    starts_inside = False


class DeepSeekR1ReasoningParser(ReasoningParser):
    starts_inside = True


def detect_reasoning_parser(chat_template_source: str | None) -> str | None:
    """The reasoning format a chat template's model writes, or None (conservatively: only a
    template that writes the think tags itself gets one)."""
    source = chat_template_source or ""
    if "</think>" not in source:
        return None
    # DeepSeek-R1's template: its own role markers (fullwidth bars); it strips `</think>` from
    # history and (in later revisions) opens the block in the generation prompt.
    if "<｜Assistant｜>" in source:
        return "deepseek_r1"
    return "qwen3" if "<think>" in source else None
