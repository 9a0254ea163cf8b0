"""Structured outputs through the official `openai` SDK, black-box: OpenAI's `response_format`
(json_object, json_schema, the SDK's `parse()` with a pydantic model) and vLLM's `structured_outputs`
and `guided_*` extensions (sent through `extra_body`), on chat and text completions.

Each output is checked against its constraint (json.loads, jsonschema, re.fullmatch, the choices),
streamed output against the non-streamed one, and a constrained request against unconstrained
ones running beside it. Greedy decoding keeps the expected values fixed; the prompts were picked
so the bundled model finishes ("stop") well within max_tokens.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pydantic
import pytest
from server_helpers import DEFAULT_MODEL, summarize_stream

pytestmark = pytest.mark.timeout(120)

PERSON_PROMPT = "Describe a person named Alice who is 30 years old."
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}

BOOK_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "genre": {"type": "string", "enum": ["fiction", "science", "history"]},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    },
    "required": ["title", "tags", "genre", "year"],
    "additionalProperties": False,
}


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def chat(oai, prompt: str, **kwargs: Any):
    return oai.chat.completions.create(model=DEFAULT_MODEL, messages=user(prompt), temperature=0, **kwargs)


def only_choice(completion):
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", f"ran to {choice.finish_reason}: {choice}"
    return choice


@pytest.fixture(scope="module")
def person(oai):
    """The non-streamed greedy answer to the person schema, made once (several tests compare with it)."""
    return chat(oai, PERSON_PROMPT, response_format=PERSON_FORMAT, max_tokens=40)


# =============================================================================================
# response_format
# =============================================================================================


def test_json_object(oai):
    choice = only_choice(
        chat(oai, "Give me a JSON object with the name and age of a person.", response_format={"type": "json_object"}, max_tokens=200)
    )
    value = json.loads(choice.message.content)
    assert isinstance(value, dict) and value, choice.message.content


def test_json_schema_strict(person):
    content = only_choice(person).message.content
    value = json.loads(content)
    jsonschema.validate(value, PERSON_SCHEMA)
    assert value == {"name": "Alice", "age": 30}
    assert content == '{"name": "Alice", "age": 30}'  # compact JSON with ", " and ": " separators


def test_json_schema_nested(oai):
    book = {"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK_SCHEMA, "strict": True}}
    choice = only_choice(chat(oai, "Describe a science book as JSON.", response_format=book, max_tokens=80))
    value = json.loads(choice.message.content)
    jsonschema.validate(value, BOOK_SCHEMA)
    assert value["genre"] == "science"


def test_sdk_parse_with_a_pydantic_model(oai):
    class Person(pydantic.BaseModel):
        name: str
        age: int

    completion = oai.chat.completions.parse(
        model=DEFAULT_MODEL, messages=user(PERSON_PROMPT), response_format=Person, temperature=0, max_tokens=40
    )
    message = only_choice(completion).message
    assert isinstance(message.parsed, Person)
    assert message.parsed == Person(name="Alice", age=30)


def test_json_schema_stream_equals_unstreamed(oai, person):
    stream = chat(oai, PERSON_PROMPT, response_format=PERSON_FORMAT, max_tokens=40, stream=True, stream_options={"include_usage": True})
    chunks = [chunk.to_dict(mode="json") for chunk in stream]
    choices, usage = summarize_stream(chunks, chat=True, include_usage=True)
    assert choices[0].finish_reason == "stop"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1, "not streamed piecewise"
    assert choices[0].text == person.choices[0].message.content
    jsonschema.validate(json.loads(choices[0].text), PERSON_SCHEMA)
    assert usage["completion_tokens"] == person.usage.completion_tokens


# =============================================================================================
# vLLM's structured_outputs and guided_* (extra_body)
# =============================================================================================

DATE = r"\d{4}-\d{2}-\d{2}"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.mark.parametrize(
    ("prompt", "extra", "pattern"),
    [
        ("When did World War II end? Give the date.", {"guided_regex": DATE}, DATE),
        ("Give me a phone number.", {"structured_outputs": {"regex": PHONE}}, PHONE),
    ],
    ids=["guided_regex", "structured_outputs.regex"],
)
def test_regex(oai, prompt, extra, pattern):
    content = only_choice(chat(oai, prompt, max_tokens=20, extra_body=extra)).message.content
    assert re.fullmatch(pattern, content), content


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs.choice"])
def test_choice(oai, field):
    choices = ["yes", "no"]
    extra = {"guided_choice": choices} if field == "guided_choice" else {"structured_outputs": {"choice": choices}}
    content = only_choice(chat(oai, "Is the sky green? Answer yes or no.", max_tokens=5, extra_body=extra)).message.content
    assert content in choices


ARITHMETIC_LARK = 'start: expr\nexpr: NUMBER | expr "+" expr | expr "*" expr\nNUMBER: /[0-9]+/'


@pytest.mark.parametrize(
    ("prompt", "extra", "pattern"),
    [
        ("Will it rain tomorrow?", {"structured_outputs": {"grammar": 'start: "yes" | "no" | "maybe"'}}, r"yes|no|maybe"),
        ("Write an arithmetic expression that equals 10.", {"structured_outputs": {"grammar": ARITHMETIC_LARK}}, r"\d+([+*]\d+)*"),
        ("Will it rain tomorrow?", {"guided_grammar": 'root ::= "yes" | "no"'}, r"yes|no"),
    ],
    ids=["lark", "lark_arithmetic", "gbnf"],
)
def test_grammar(oai, prompt, extra, pattern):
    content = only_choice(chat(oai, prompt, max_tokens=12, extra_body=extra)).message.content
    assert re.fullmatch(pattern, content), content


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_json": PERSON_SCHEMA},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}},
    ],
    ids=["guided_json", "response_format"],
)
def test_completions_json(oai, extra):
    completion = oai.completions.create(
        model=DEFAULT_MODEL, prompt="Alice is 30 years old. As JSON:", temperature=0, max_tokens=40, extra_body=extra
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.text), PERSON_SCHEMA)


# =============================================================================================
# With n, logprobs, and beside unconstrained requests
# =============================================================================================


def test_n_sampled_choices_all_valid(oai):
    completion = oai.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=user("Describe a person."),
        response_format=PERSON_FORMAT,
        temperature=0.8,
        seed=7,
        n=2,
        max_tokens=40,
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


def test_logprobs_follow_the_constrained_tokens(oai, person):
    completion = chat(oai, PERSON_PROMPT, response_format=PERSON_FORMAT, max_tokens=40, logprobs=True, top_logprobs=2)
    choice = only_choice(completion)
    assert choice.message.content == person.choices[0].message.content  # logprobs change nothing
    entries = choice.logprobs.content
    assert entries, "no logprobs"
    assert "".join(entry.token for entry in entries) == choice.message.content
    # The grammar ends the choice on the object's last token: no end-of-turn token follows, so
    # every generated token is shown.
    assert len(entries) == completion.usage.completion_tokens
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in entries)


PLAIN_PROMPTS = ["What is the capital of France?", "Name three colours.", "Count from one to five."]


def test_constraint_does_not_affect_concurrent_requests(oai, person):
    def plain(prompt: str) -> str:
        return chat(oai, prompt, max_tokens=6).choices[0].message.content

    alone = [plain(prompt) for prompt in PLAIN_PROMPTS]
    # Hold the constrained request mid-generation (its first content chunk has arrived) while the
    # unconstrained ones run, so they share batches with it.
    stream = iter(chat(oai, PERSON_PROMPT, response_format=PERSON_FORMAT, max_tokens=40, stream=True))
    text = ""
    while not text:
        chunk = next(stream)
        text = (chunk.choices[0].delta.content or "") if chunk.choices else ""
    start = threading.Barrier(len(PLAIN_PROMPTS))

    def plain_together(prompt: str) -> str:
        start.wait(timeout=30)
        return plain(prompt)

    with ThreadPoolExecutor(len(PLAIN_PROMPTS)) as pool:
        together = list(pool.map(plain_together, PLAIN_PROMPTS))
    text += "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert together == alone
    assert not any(answer.lstrip().startswith("{") for answer in together), together
    assert text == person.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
