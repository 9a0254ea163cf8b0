"""Tool-call parsers: a fixture table per format, each case checked under every way of splitting it.

For every case the parser must give the table's content and calls whether the text comes whole,
in two pieces (at every boundary), character by character, in word pieces, or token by token as
the bundled SmolLM2 tokenizer splits and incrementally decodes it. While feeding, what was emitted
so far must always be a prefix of the expected result (nothing is ever retracted), and markup of
valid calls must never reach the content. The registry and template detection are checked too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from heron.models.bundled import BundledModelMissing, default_chat_model_path
from heron.parsers import (
    ParsedDelta,
    ToolCall,
    detect_tool_parser,
    get_tool_parser,
    register_tool_parser,
    tool_parser_names,
)

TOOLS = ("get_weather", "get_time", "search")

MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "generic": ("```",),
}

# Argument values with everything a naive scanner trips on: braces and brackets, quotes, escaped
# quotes, backslashes, closing tags, markers and non-ASCII text inside strings.
TRICKY = {
    "q": 'a {b} [c] "d" \\ </tool_call> [TOOL_CALLS] <|python_tag|> ``` ; }{',
    "text": "café 日本語 😀",
    "nested": {"list": [1, {"x": "}]"}, None, True], "empty": {}},
}
TRICKY_JSON = json.dumps(TRICKY)  # escaped quotes, \\ and ASCII escapes for the non-ASCII text
TRICKY_RAW = json.dumps(TRICKY, ensure_ascii=False)  # the same with raw UTF-8 characters


@dataclass(frozen=True)
class Case:
    parser: str
    id: str
    text: str
    content: str
    calls: list[tuple[str, dict]] = field(default_factory=list)
    tool_names: tuple[str, ...] | None = TOOLS
    streamed: bool = True  # every call is out before finish() when the text comes in one piece

    def expected_calls(self) -> list[ToolCall]:
        return [ToolCall(name, json.dumps(args, ensure_ascii=False)) for name, args in self.calls]


def same(parser: str, case_id: str, text: str, **kwargs) -> Case:
    """A case where no call is made: the whole text is content, verbatim."""
    return Case(parser, case_id, text, text, **kwargs)


WEATHER = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {})
TIME_UTC = ("get_time", {"tz": "UTC"})
SEARCH = ("search", TRICKY)

HERMES = [
    same("hermes", "plain", "Hello! How can I help you today?\n"),
    same("hermes", "angle_brackets_in_prose", "If a < b then <b>bold</b>, <tool> or <tool_call-ish <tool_"),
    Case(
        "hermes", "text_then_call", 'Sure!\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
        "Sure!", [WEATHER],
    ),
    Case(
        "hermes", "parallel",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "", [WEATHER, TIME],
    ),
    Case("hermes", "tricky_arguments", f'<tool_call>{{"name": "search", "arguments": {TRICKY_JSON}}}</tool_call>', "", [SEARCH]),
    Case("hermes", "raw_unicode", f'<tool_call>{{"name": "search", "arguments": {TRICKY_RAW}}}</tool_call>', "", [SEARCH]),
    Case(
        "hermes", "arguments_as_string",
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>', "", [TIME_UTC],
    ),
    Case(
        "hermes", "smollm2_list",
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]</tool_call>',
        "", [WEATHER, TIME],
    ),
    Case(
        "hermes", "content_between_and_after",
        ' Let me look.  <tool_call>{"name": "get_time"}</tool_call>\n\nand also\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n\n  Done.  \n',
        " Let me look.and alsoDone.  \n", [TIME, WEATHER],
    ),
    same("hermes", "unknown_tool", 'Let me try.\n<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>\n'),
    same("hermes", "malformed_json", '<tool_call>{"name": "get_time", arguments: {}}</tool_call> then text'),
    same("hermes", "unbalanced_json", '<tool_call>{"name": "get_time", "arguments": {}</tool_call> then {text}'),
    same("hermes", "not_json", "<tool_call>get_time()</tool_call>"),
    same("hermes", "truncated", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),
    same("hermes", "truncated_after_open_tag", "Checking.\n<tool_call>\n"),
    Case(
        "hermes", "unclosed_at_eos", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        "Sure.", [WEATHER], streamed=False,
    ),
    Case("hermes", "eos_inside_close_tag", '<tool_call>{"name": "get_time"}</tool_', "", [TIME], streamed=False),
    Case(
        "hermes", "invalid_then_valid",
        '<tool_call>{"name": "nope"}</tool_call>\n<tool_call>{"name": "get_time"}</tool_call>',
        '<tool_call>{"name": "nope"}</tool_call>', [TIME],
    ),
    Case(
        "hermes", "any_tool_name", '<tool_call>{"name": "anything", "arguments": {"k": 1}}</tool_call>',
        "", [("anything", {"k": 1})], tool_names=None,
    ),
]

LLAMA3 = [
    same("llama3_json", "plain", "The weather in Paris is sunny. {Braces} later are fine.\n"),
    same("llama3_json", "angle_bracket_first", "  <b>Bold</b> claim: <|python_tag is not the tag"),
    Case("llama3_json", "bare", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    Case("llama3_json", "python_tag", '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}', "", [TIME_UTC]),
    Case(
        "llama3_json", "semicolons",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
        "", [WEATHER, TIME],
    ),
    Case(
        "llama3_json", "whitespace_separated",
        '\n\n<|python_tag|>{"name": "get_time", "arguments": {}}\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n',
        "", [TIME, WEATHER],
    ),
    Case("llama3_json", "tricky_arguments", f'{{"name": "search", "parameters": {TRICKY_RAW}}}', "", [SEARCH]),
    Case(
        "llama3_json", "arguments_as_string", '{"name": "get_time", "parameters": "{\\"tz\\": \\"UTC\\"}"}', "", [TIME_UTC]
    ),
    Case(
        "llama3_json", "call_then_prose", '{"name": "get_time", "parameters": {}}\n\nI checked the time; it is late.',
        "I checked the time; it is late.", [TIME],
    ),
    same("llama3_json", "unknown_tool", '{"name": "launch_rocket", "parameters": {}}'),
    same("llama3_json", "malformed_json", '<|python_tag|>{"name": get_time, "parameters": {}}'),
    same("llama3_json", "not_json_after_tag", '<|python_tag|>print("hello")'),
    same("llama3_json", "truncated", '<|python_tag|>{"name": "get_weather", "parameters": {"ci'),
    same("llama3_json", "braces_in_prose", "{curly} braces are fun"),
    Case(
        "llama3_json", "invalid_then_valid",
        '{"name": "nope", "parameters": {}} ; {"name": "get_time", "parameters": {}}',
        '{"name": "nope", "parameters": {}}', [TIME],
    ),
    Case(
        "llama3_json", "truncated_second_call", '{"name": "get_time", "parameters": {}}; {"name": "get_wea',
        '{"name": "get_wea', [TIME],
    ),
]

MISTRAL = [
    same("mistral", "plain", "Bonjour! See [1] and [the docs](http://x) or [TOOL_CALL] and [TOOL_"),
    Case("mistral", "array", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),
    Case(
        "mistral", "array_parallel",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
        "", [WEATHER, TIME],
    ),
    Case(
        "mistral", "text_then_array", 'Let me check.\n[TOOL_CALLS][{"name": "get_time", "arguments": {}}]\n',
        "Let me check.", [TIME],
    ),
    Case("mistral", "named", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [WEATHER]),
    Case(
        "mistral", "named_parallel", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        "", [WEATHER, TIME],
    ),
    Case("mistral", "named_call_id", '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"tz": "UTC"}', "", [TIME_UTC]),
    Case("mistral", "tricky_arguments", f"[TOOL_CALLS]search[ARGS]{TRICKY_JSON}", "", [SEARCH]),
    Case(
        "mistral", "tricky_in_array", f'[TOOL_CALLS][{{"name": "search", "arguments": {TRICKY_RAW}}}]', "", [SEARCH]
    ),
    Case(
        "mistral", "arguments_as_string",
        '[TOOL_CALLS][{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]', "", [TIME_UTC],
    ),
    same("mistral", "unknown_tool", "[TOOL_CALLS]launch_rocket[ARGS]{}"),
    same("mistral", "unknown_in_array", '[TOOL_CALLS][{"name": "get_time"}, {"name": "launch_rocket"}] ok'),
    same("mistral", "malformed_json", '[TOOL_CALLS][{"name": "get_time", "arguments": {]}] after'),
    same("mistral", "truncated", 'OK [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par'),
    same("mistral", "truncated_name", "[TOOL_CALLS]get_wea"),
    same("mistral", "marker_then_prose", "[TOOL_CALLS] Sorry, no tool fits [here]."),
    Case("mistral", "whitespace", "\n [TOOL_CALLS]get_time[ARGS]{}\n", "", [TIME]),
]

GENERIC = [
    same("generic", "plain", "The answer is 42. {Not} a [call].\n"),
    same("generic", "bracket_first", "[1] is a citation, not a call."),
    Case("generic", "bare_object", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [WEATHER]),
    Case("generic", "parameters", '  {"name": "get_time", "parameters": {"tz": "UTC"}}  \n', "", [TIME_UTC]),
    Case(
        "generic", "array",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
        "", [WEATHER, TIME],
    ),
    Case(
        "generic", "tool_calls_object",
        '{"tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}}, '
        '{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
        "", [TIME_UTC, WEATHER],
    ),
    Case("generic", "fenced_json", '```json\n{"name": "get_time", "arguments": {}}\n```', "", [TIME]),
    Case("generic", "fenced_bare_then_text", '\n```\n[{"name": "get_time"}]\n```\n\nDone.', "Done.", [TIME]),
    Case("generic", "fence_unclosed_at_eos", '```JSON\n{"name": "get_time", "arguments": {}}\n', "", [TIME]),
    Case("generic", "tricky_arguments", f'{{"name": "search", "arguments": {TRICKY_JSON}}}', "", [SEARCH]),
    same("generic", "fenced_other_language", "```python\nprint({'name': 1})\n```"),
    same("generic", "unknown_tool", '{"name": "launch_rocket", "arguments": {}}'),
    same("generic", "malformed_json", '{"name": "get_time" "arguments": {}}'),
    same("generic", "not_calls", '```json\n{"answer": 42}\n```'),
    same("generic", "one_bad_in_array", '[{"name": "get_time"}, {"name": "get_time", "arguments": [1]}]'),
    same("generic", "truncated", '{"name": "get_weather", "arguments": {"city": "Pa'),
    Case(
        "generic", "any_tool_name", '{"name": "anything", "arguments": {"k": "v"}}', "", [("anything", {"k": "v"})],
        tool_names=None,
    ),
]

CASES = HERMES + LLAMA3 + MISTRAL + GENERIC


# ----------------------------------------------------------------------------------- splits


def _word_pieces(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def smollm2_pieces() -> Callable[[str], list[str]]:
    """Splits text as SmolLM2 would generate it: its tokens, decoded by growing prefixes."""
    try:
        path = default_chat_model_path()
    except BundledModelMissing:
        pytest.skip("the bundled SmolLM2 model is not installed")
    # Imported here: reading GGUF metadata pulls in torch, which the other splits do not need.
    from heron.models.gguf import GGUFFile
    from heron.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile(path).metadata)

    def split(text: str) -> list[str]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces, emitted = [], ""
        for end in range(1, len(ids) + 1):
            decoded = tokenizer.decode(ids[:end], skip_special_tokens=False)
            if decoded.endswith("\ufffd") and end < len(ids):
                continue  # a character split across tokens: wait for its last byte
            assert decoded.startswith(emitted)
            pieces.append(decoded[len(emitted) :])
            emitted = decoded
        assert emitted == text
        return pieces

    return split


def _run(case: Case, pieces: list[str]) -> tuple[str, list[ToolCall], list[ParsedDelta]]:
    """Feeds the pieces, checking after each that nothing emitted so far departs from the table."""
    parser = get_tool_parser(case.parser)(case.tool_names)
    expected_calls = case.expected_calls()
    content, calls, deltas = "", [], []
    for piece in [*pieces, None]:
        delta = parser.finish() if piece is None else parser.feed(piece)
        deltas.append(delta)
        content += delta.content
        calls += delta.tool_calls
        assert case.content.startswith(content), (content, pieces)
        assert calls == expected_calls[: len(calls)]
        for marker in MARKERS[case.parser]:
            assert marker not in delta.content or marker in case.content
    return content, calls, deltas


def _check(case: Case, pieces: list[str]) -> list[ParsedDelta]:
    content, calls, deltas = _run(case, pieces)
    assert content == case.content, pieces
    assert calls == case.expected_calls(), pieces
    return deltas


# ------------------------------------------------------------------------------------ tests


def test_table_covers_every_format():
    assert sorted({case.parser for case in CASES}) == tool_parser_names()
    for name in tool_parser_names():
        assert sum(case.parser == name for case in CASES) >= 8
    ids = [(case.parser, case.id) for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.parser}-{case.id}")
def test_whole(case):
    content, calls = get_tool_parser(case.parser).parse(case.text, case.tool_names)
    assert (content, calls) == (case.content, case.expected_calls())
    deltas = _check(case, [case.text])
    assert (deltas[0].tool_calls == case.expected_calls()) == case.streamed


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.parser}-{case.id}")
def test_split_in_two_everywhere(case):
    for cut in range(len(case.text) + 1):
        _check(case, [case.text[:cut], case.text[cut:]])


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.parser}-{case.id}")
def test_character_by_character(case):
    _check(case, list(case.text))


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.parser}-{case.id}")
def test_word_pieces(case):
    _check(case, _word_pieces(case.text))


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.parser}-{case.id}")
def test_smollm2_tokens(case, smollm2_pieces):
    pieces = smollm2_pieces(case.text)
    _check(case, pieces)
    # Empty pieces (tokens that complete no character) are fed too; they must change nothing.
    _check(case, [piece for token in pieces for piece in (token, "")])


def test_markers_of_valid_calls_never_reach_content():
    for case in CASES:
        if case.calls and not any(marker in case.content for marker in MARKERS[case.parser]):
            for piece_list in ([case.text], list(case.text)):
                content, _, _ = _run(case, piece_list)
                for marker in MARKERS[case.parser]:
                    assert marker not in content


# --------------------------------------------------------------------------------- registry


def test_registry():
    assert tool_parser_names() == ["generic", "hermes", "llama3_json", "mistral"]
    for name in tool_parser_names():
        assert get_tool_parser(name).name == name
    with pytest.raises(ValueError, match="unknown tool parser 'nope'.*generic, hermes, llama3_json, mistral"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_tool_parser("hermes")(type("Again", (get_tool_parser("hermes"),), {}))


def test_special_token_formats():
    keeps = {name: get_tool_parser(name).keeps_special_tokens for name in tool_parser_names()}
    assert keeps == {"generic": False, "hermes": False, "llama3_json": True, "mistral": True}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, "hermes"),
        ("", "hermes"),
        ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}", "hermes"),
        ("{%- if tools %}<tools>{{ tools }}</tools> reply in <tool_call></tool_call>{% endif %}", "hermes"),
        ("{%- if message.tool_calls %}[TOOL_CALLS]{{ message.tool_calls | tojson }}{% endif %}", "mistral"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
        ("{%- if message.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>{% endif %}", "llama3_json"),
    ],
)
def test_detect_tool_parser(template, expected):
    assert detect_tool_parser(template) == expected


def test_feed_after_finish_is_an_error():
    parser = get_tool_parser("hermes")(TOOLS)
    assert parser.feed("hi \n").content == "hi"
    assert parser.finish().content == " \n"
    assert parser.finish() == ParsedDelta()
    with pytest.raises(RuntimeError):
        parser.feed("more")
