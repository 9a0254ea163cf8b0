"""Reasoning parsers (heron/parsers/reasoning.py): think blocks split from content, in any pieces.

Every split of each output (all 2-way and 3-way splits, character by character, random ones) must
give the same (reasoning, content) as feeding it whole, and the expected one; a tool call after
`</think>` is extracted, one written inside the block is not.
"""

from __future__ import annotations

import json
import random
from itertools import combinations

import pytest

from heron.models.bundled import BundledModelMissing, default_chat_model_path
from heron.parsers import (
    detect_reasoning_parser,
    get_reasoning_parser,
    reasoning_parser_names,
)
from heron.server.tool_calls import ToolCallExtractor, ToolPlan

# (parser, prompt state, output, expected reasoning, expected content)
CASES = [
    ("qwen3", {}, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("qwen3", {}, "<think>\n\n</think>\n\nHi there", "", "Hi there"),
    ("qwen3", {}, "Just an answer, no block.", "", "Just an answer, no block."),
    ("qwen3", {}, "  <thinking> is not the tag", "", "  <thinking> is not the tag"),
    ("qwen3", {}, "a <think>inside</think> later", "", "a <think>inside</think> later"),
    ("qwen3", {}, "<thi", "", "<thi"),
    ("qwen3", {}, "<think>unterminated reasoning", "unterminated reasoning", ""),
    ("qwen3", {}, "<think>a < b and </thin is not </think>done", "a < b and </thin is not ", "done"),
    ("qwen3", {}, "<think>line1\n\nline2\n\n</think>", "line1\n\nline2", ""),
    ("qwen3", {"prompt_opened": True}, "opened by the prompt\n</think>\n\nok", "opened by the prompt", "ok"),
    ("qwen3", {"prompt_closed": True}, "<think>x</think>y", "", "<think>x</think>y"),
    ("qwen3", {}, "", "", ""),
    ("deepseek_r1", {}, "no opening tag\n</think>\n\nAnswer.", "no opening tag", "Answer."),
    ("deepseek_r1", {}, "<think>\nwith the tag\n</think>Answer.", "with the tag", "Answer."),
    ("deepseek_r1", {"prompt_opened": True}, "Okay, so 2+2.\n</think>\n\n4", "Okay, so 2+2.", "4"),
    ("deepseek_r1", {}, "never closed", "never closed", ""),
    ("deepseek_r1", {}, "ends with a partial </thi", "ends with a partial </thi", ""),
    ("deepseek_r1", {"implicit_start": False}, '{"a": 1}', "", '{"a": 1}'),
]
IDS = [f"{p}-{i}" for i, (p, *_rest) in enumerate(CASES)]


def run(name: str, state: dict, pieces: list[str]) -> tuple[str, str]:
    parser = get_reasoning_parser(name)(**state)
    reasoning, content = [], []
    for i, piece in enumerate(pieces):
        r, c = parser.feed(piece, final=i == len(pieces) - 1)
        reasoning.append(r)
        content.append(c)
    if not pieces:
        r, c = parser.feed("", final=True)
        reasoning.append(r)
        content.append(c)
    assert (parser.reasoning, parser.content) == ("".join(reasoning), "".join(content))
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_whole(case):
    name, state, text, reasoning, content = case
    assert run(name, state, [text]) == (reasoning, content)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_two_and_three_way_split(case):
    name, state, text, reasoning, content = case
    for cuts in [*combinations(range(len(text) + 1), 1), *combinations(range(len(text) + 1), 2)]:
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert run(name, state, pieces) == (reasoning, content), pieces


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_character_by_character_and_random_splits(case):
    name, state, text, reasoning, content = case
    assert run(name, state, list(text)) == (reasoning, content)
    rng = random.Random(len(text))
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text) + 1))))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert run(name, state, pieces) == (reasoning, content), pieces


def test_partial_tags_are_held_back():
    parser = get_reasoning_parser("qwen3")()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>abc </thi") == ("abc ", "")  # only the partial tag waits
    assert parser.feed("nk>\n\nrest") == ("", "rest")
    parser = get_reasoning_parser("qwen3")()
    assert parser.feed("<thx") == ("", "<thx")  # decided as soon as it cannot be the tag


def test_empty_feeds_and_final_flush():
    parser = get_reasoning_parser("deepseek_r1")()
    assert parser.feed("") == ("", "")
    assert parser.feed("reason </th") == ("reason ", "")
    assert parser.feed("", final=True) == ("</th", "")


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def reason_then_extract(text: str, pieces_at: list[int]) -> tuple[str, str, list]:
    """The chat pipeline's order: reasoning split first, the tool-call extractor on the content."""
    reasoner = get_reasoning_parser("qwen3")()
    extractor = ToolCallExtractor(ToolPlan([WEATHER], "auto", None, True, False, "hermes"))
    bounds = [0, *pieces_at, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    reasoning, content, calls = "", "", []
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        r, c = reasoner.feed(piece, final)
        c, new = extractor.feed(c, final)
        reasoning, content, calls = reasoning + r, content + c, calls + new
    return reasoning, content, [(call.name, json.loads(call.arguments)) for _, _, call in calls]


def test_tool_call_after_the_block_is_extracted_and_one_inside_is_not():
    inside = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    text = f"<think>\nMaybe {inside}?\n</think>\n\n" + '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    for cuts in [[], [7], [20, 60], list(range(1, len(text), 3))]:
        reasoning, content, calls = reason_then_extract(text, cuts)
        assert reasoning == f"Maybe {inside}?"
        assert content == ""
        assert calls == [("get_weather", {"city": "Paris"})]


def test_registry():
    assert reasoning_parser_names() == ["deepseek_r1", "qwen3"]
    assert get_reasoning_parser("qwen3").name == "qwen3"
    with pytest.raises(ValueError, match="known parsers: deepseek_r1, qwen3"):
        get_reasoning_parser("nope")


def test_prompt_state():
    qwen3 = get_reasoning_parser("qwen3")
    assert qwen3.prompt_state("<|im_start|>assistant\n<think>\n") == {"prompt_opened": True}
    assert qwen3.prompt_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") == {"prompt_closed": True}
    assert qwen3.prompt_state("<|im_start|>assistant\n") == {}


QWEN3_LIKE = "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
R1_LIKE = "{{'<｜Assistant｜><think>\\n'}}{% if '</think>' in content %}{% endif %}"


@pytest.mark.parametrize(
    ("template", "expected"),
    [(None, None), ("", None), ("{{ messages }}", None), (QWEN3_LIKE, "qwen3"), (R1_LIKE, "deepseek_r1"),
     ("mentions <think> only", None), ("{{ content.split('</think>')[-1] }}", None),
     ("{{'<｜Assistant｜>' + content.split('</think>')[-1]}}", "deepseek_r1")],
)
def test_detect_reasoning_parser(template, expected):
    assert detect_reasoning_parser(template) == expected


def test_bundled_and_fixture_templates_get_no_reasoning_parser():
    from pathlib import Path

    for path in (Path(__file__).parent.parent / "fixtures" / "chat_templates").glob("*.jinja"):
        if "qwen3" not in path.name:
            assert detect_reasoning_parser(path.read_text()) is None, path.name
    try:
        path = default_chat_model_path()
    except BundledModelMissing:
        pytest.skip("bundled chat model not present")
    from heron.models.gguf import GGUFFile

    assert detect_reasoning_parser(GGUFFile(path).metadata["tokenizer.chat_template"]) is None


def test_reasoning_parser_option():
    from heron.server.settings import parse_args

    assert parse_args([], environ={}).reasoning_parser is None
    assert parse_args(["--reasoning-parser", "qwen3"], environ={}).reasoning_parser == "qwen3"
    assert parse_args([], environ={"HERON_REASONING_PARSER": "deepseek_r1"}).reasoning_parser == "deepseek_r1"
    assert parse_args(["--reasoning-parser", "none"], environ={"HERON_REASONING_PARSER": "qwen3"}).reasoning_parser == "none"
    with pytest.raises(SystemExit):
        parse_args(["--reasoning-parser", "bogus"], environ={})
