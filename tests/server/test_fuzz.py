"""Property-based fuzzing of the request bodies of the server's JSON endpoints.

On a server of the module's own (the session default's configuration), Hypothesis builds bodies for
POST /v1/chat/completions, /v1/completions, /v1/embeddings and /tokenize: a valid body (required
fields, a few optional ones), then 0-3 mutations, each making one field invalid (wrong JSON types,
out-of-range and huge numbers, NaN / Infinity as JSON literals and as strings, nested junk, empty
lists, broken tools / response_format / structured-output constraints, odd Unicode), dropping a
required field or adding an unknown one. Whatever it sends, the server must:

- never answer 5xx, never drop the connection, never hang (every request has a client timeout);
- answer 4xx only as 400 / 404, in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`;
- answer 200 with a body (or SSE chunks) matching OpenAI's spec, with consistent usage.

A body that would generate always says max_tokens 1 (or an invalid max_tokens the server must
refuse), so accepted requests are one decoding step. The runs are deterministic
(`derandomize=True`, no example database) and sized for the whole file to take well under a minute
on a 2-core CPU; HERON_TEST_FUZZ_SCALE multiplies every example count for a longer local run
(`--hypothesis-show-statistics` shows how the statuses split).

The bugs the fuzzing found (all fixed) are pinned at the end as regression tests, and their inputs
are part of the fuzzing too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from server_helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MODEL,
    ResponseChecker,
    Server,
    check_schema,
    make_client,
    parse_sse,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.timeout(180)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDINGS_PATH = "/v1/embeddings"
TOKENIZE_PATH = "/tokenize"
CHAT_VOCAB = 49152  # SmolLM2
EMBEDDING_VOCAB = 30522  # MiniLM (BERT uncased)
REQUEST_TIMEOUT_S = 30.0  # one decoding step takes well under a second; past this the server hangs
ALLOWED_ERROR_STATUSES = {400, 404}

SCALE = float(os.environ.get("HERON_TEST_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# =============================================================================================
# Garbage: anything JSON can carry, and the values that tend to break parsers
# =============================================================================================

# Lone surrogates: valid JSON escapes ("\ud800") that decode to invalid Unicode (once a 500 on
# every endpoint that tokenizes; see test_lone_surrogate_is_a_400 below).
LONE_SURROGATES = ["\ud800", "a\udfff"]
FUZZ_SURROGATES = True
# Unknown field names are echoed in the X-Heron-Ignored-Fields response header: one outside
# Latin-1 was once a 500, one with a control character (CR, LF...) a dropped connection
# (test_odd_unknown_field_name_is_ignored below). Generated field names include both.
FUZZ_ODD_FIELD_NAMES = True
field_names = (
    st.text(min_size=1, max_size=10)
    if FUZZ_ODD_FIELD_NAMES
    else st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=10)
)

SPECIAL_SCALARS = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
    0.5, -0.0, 1e308, -1e308, 1e-320, math.nan, math.inf, -math.inf,
    "", " ", "NaN", "Infinity", "-Infinity", "null", "true", "1", "0.5", "1e999",
]
ODD_STRINGS = [
    "\x00", "🦜" * 3, "é", "\u202e", "\n\n", "<|im_end|>", "<|im_start|>system\n", "</s>", "{{ 7*7 }}", "{% raw %}", "{{", "\\u0000",
    *(LONE_SURROGATES if FUZZ_SURROGATES else []),
]
any_text = st.one_of(st.text(max_size=24), st.sampled_from(ODD_STRINGS))
scalars = st.one_of(
    st.sampled_from(SPECIAL_SCALARS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.booleans(),
)
garbage = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(["type", "name", "role", "content", "text", ""]), field_names), children, max_size=3),
    ),
    max_leaves=6,
)
# Garbage that is not null: where null means "not given", a null max_tokens would ask for the
# whole context (hundreds of tokens) and slow the run down for nothing.
non_null_garbage = garbage.filter(lambda value: value is not None)
short_text = st.text(max_size=24)


@dataclass(frozen=True)
class FieldSpec:
    valid: st.SearchStrategy
    invalid: st.SearchStrategy


def field(valid: st.SearchStrategy, invalid: st.SearchStrategy | None = None) -> FieldSpec:
    """A field's valid values, and its invalid ones (targeted values, plus any garbage)."""
    return FieldSpec(valid, garbage if invalid is None else st.one_of(invalid, invalid, garbage))


@st.composite
def request_bodies(
    draw: st.DrawFn,
    required: dict[str, FieldSpec],
    optional: dict[str, FieldSpec],
    always: dict[str, FieldSpec] | None = None,
) -> dict[str, Any]:
    """A valid body (the required fields, `always` ones, a few optional ones), then 0-3 mutations:
    a field made invalid, a required field dropped, an unknown field added. Mutating one field at a
    time reaches the checks behind the first one, which all-random bodies would never pass."""
    always = always or {}
    specs = {**required, **always, **optional}
    body = {name: draw(spec.valid) for name, spec in {**required, **always}.items()}
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=6)):
        body[name] = draw(optional[name].valid)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3]))):
        mutation = draw(st.sampled_from(["invalid", "invalid", "invalid", "invalid", "missing", "unknown"]))
        if mutation == "invalid":
            name = draw(st.sampled_from(sorted(specs)))
            body[name] = draw(specs[name].invalid)
        elif mutation == "missing":
            body.pop(draw(st.sampled_from(sorted(required))), None)
        else:
            body[draw(field_names.filter(lambda k: k not in specs))] = draw(garbage)
    return body


# =============================================================================================
# Field strategies
# =============================================================================================

# Max tokens: 1, or a value the server must refuse (never null: see non_null_garbage).
MAX_TOKENS = FieldSpec(st.just(1), st.one_of(non_null_garbage, st.sampled_from([0, -1, 10**9, 2**64, "1", 1.0, True])))
unit_float = st.floats(min_value=0.0, max_value=1.0)
boolean = field(st.booleans(), st.sampled_from([0, 1, "true", "false", []]))
CHAT_TOKEN_IDS = st.lists(st.integers(0, CHAT_VOCAB - 1), min_size=1, max_size=6)
BAD_TOKEN_IDS = st.sampled_from([[], [-1], [CHAT_VOCAB], [2**40], [2**64], [1, "2"], [[1]], [1.0], [True]])
TINY_SCHEMAS = [
    {"type": "boolean"},
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "string", "enum": ["a", "b"]},
    {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    {"type": "array", "items": {"type": "number"}, "maxItems": 2},
    {"type": "string", "pattern": "^[a-c]+$"},
    {},
]
BAD_SCHEMAS = [
    {"type": "banana"},
    {"type": "object", "properties": 5},
    {"$ref": "#/definitions/nowhere"},
    {"type": "string", "pattern": "("},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"enum": []},
    {"anyOf": []},
    {"type": ["string", 7]},
    {"not": {}},
    {"type": "string", "minLength": 2**64},
    {"type": "array", "minItems": 10**9},
    {"type": "object", "required": ["x"], "additionalProperties": False},
]
json_schema_valid = st.sampled_from(TINY_SCHEMAS)
json_schema_invalid = st.one_of(
    st.sampled_from(BAD_SCHEMAS),
    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "$ref", "required", "pattern"]), garbage, min_size=1, max_size=3),
)
REGEXES = ["[a-z]+", "yes|no", r"\d{1,3}", ".+", r"\p{L}+", "a{1,1000}"]
BAD_REGEXES = ["(", "[", "a{2,1}", "(?P<x>a)(?P=x)", "", "(?=a)b", "a**", "\\"]
GRAMMARS = ['root ::= "yes" | "no"', 'start: "a" | "b"', "root ::= [a-z]{1,3}"]
BAD_GRAMMARS = ["root ::= ", "garbage ][", "", "start: undefined_rule", 'root ::= "a" root']
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NOOP_TOOL = {"type": "function", "function": {"name": "noop"}}

SAMPLING_FIELDS: dict[str, FieldSpec] = {
    "temperature": field(st.floats(0.0, 2.0), st.sampled_from([5, -0.1, 2.0001, "0.5", math.nan, math.inf, True])),
    "top_p": field(unit_float, st.sampled_from([1.5, -0.1, "1", math.nan])),
    "frequency_penalty": field(st.floats(-2.0, 2.0), st.sampled_from([3, -2.5, "1", math.nan, -math.inf])),
    "presence_penalty": field(st.floats(-2.0, 2.0), st.sampled_from([3, -2.5, "1", math.nan])),
    "repetition_penalty": field(st.floats(0.01, 3.0), st.sampled_from([0, -1, math.inf, "1"])),
    "min_p": field(unit_float, st.sampled_from([1.5, -0.5])),
    "top_k": field(st.one_of(st.integers(-1, 50), st.sampled_from([CHAT_VOCAB, 2**40])), st.sampled_from([-2, "5", 1.5])),
    "n": field(st.integers(1, 2), st.sampled_from([0, -1, 129, 2**64, "2", 2.0, True])),
    "seed": field(st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, -(2**63) - 1, "7", 7.5])),
    "stop": field(
        st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4)),
        st.sampled_from([[], ["a"] * 5, [1], 5, [None], ["a", 1]]),
    ),
    "stream": boolean,
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), st.sampled_from([{"include_usage": "yes"}, [], "usage"])),
    "logit_bias": field(
        st.dictionaries(st.integers(0, CHAT_VOCAB - 1).map(str), st.integers(-100, 100), max_size=3),
        st.sampled_from([{"abc": 1}, {"1": 101}, {"1": -101}, {str(CHAT_VOCAB): 1}, {str(2**70): 1}, {"1": 1.5}, {"1": "1"}, {"-1": 1}, {"": 1}, []]),
    ),
    "user": field(short_text),
    "min_tokens": field(st.integers(0, 1), st.sampled_from([-1, 2, 2**64, "0"])),
    "ignore_eos": boolean,
    "stop_token_ids": field(CHAT_TOKEN_IDS, BAD_TOKEN_IDS),
    "skip_special_tokens": boolean,
    "include_stop_str_in_output": boolean,
    "response_format": field(
        st.one_of(
            st.just({"type": "text"}),
            st.just({"type": "json_object"}),
            st.builds(lambda schema, strict: {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}, json_schema_valid, st.booleans()),
        ),
        st.one_of(
            st.sampled_from([{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, {}, "json"]),
            st.builds(lambda schema: {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}, json_schema_invalid),
            st.builds(lambda name, schema: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, garbage, garbage),
        ),
    ),
    "guided_choice": field(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3), st.sampled_from([[], [""], ["a", 1], "a", [["a"]]])),
    "guided_regex": field(st.sampled_from(REGEXES), st.sampled_from(BAD_REGEXES)),
    "guided_json": field(st.one_of(json_schema_valid, st.just('{"type": "boolean"}')), st.one_of(json_schema_invalid, st.just("{not json"))),
    "guided_grammar": field(st.sampled_from(GRAMMARS), st.sampled_from(BAD_GRAMMARS)),
    "structured_outputs": field(
        st.one_of(
            st.builds(lambda c: {"choice": c}, st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3)),
            st.builds(lambda r: {"regex": r}, st.sampled_from(REGEXES)),
            st.builds(lambda s: {"json": s}, json_schema_valid),
            st.builds(lambda g: {"grammar": g}, st.sampled_from(GRAMMARS)),
            st.just({"json_object": True}),
        ),
        st.one_of(
            st.sampled_from([{}, {"choice": ["a"], "regex": "a"}, {"choice": []}, {"json": 5}, {"regex": 5}, {"nope": 1}, [], "json", {"json_object": False}]),
            st.builds(lambda r: {"regex": r}, st.sampled_from(BAD_REGEXES)),
            st.builds(lambda s: {"json": s}, json_schema_invalid),
            st.builds(lambda g: {"grammar": g}, st.sampled_from(BAD_GRAMMARS)),
        ),
    ),
}

text_part = st.builds(lambda t: {"type": "text", "text": t}, any_text)
valid_message = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, st.one_of(any_text, st.lists(text_part, min_size=1, max_size=2))),
    st.builds(lambda c: {"role": "system", "content": c}, any_text),
    st.builds(lambda c: {"role": "developer", "content": c}, any_text),
    st.builds(lambda c, name: {"role": "user", "content": c, "name": name}, any_text, st.text(min_size=1, max_size=8)),
    st.builds(lambda c: {"role": "assistant", "content": c}, any_text),
    st.just({"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
    st.builds(lambda c: {"role": "tool", "tool_call_id": "call_1", "content": c}, any_text),
)
invalid_message = st.one_of(
    st.sampled_from(
        [
            {"role": "robot", "content": "hi"},
            {"role": "user"},
            {"content": "hi"},
            {"role": "user", "content": []},
            {"role": "user", "content": None},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]},
            {"role": "user", "content": [{"type": "video", "video": "x"}]},
            {"role": "user", "content": [{"type": "text"}]},
            {"role": "tool", "content": "no id"},
            {"role": "assistant", "tool_calls": [{"id": 1}]},
            {"role": "assistant", "tool_calls": []},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
            {"role": "function", "name": "f"},
            "hello",
        ]
    ),
    st.builds(lambda role, content: {"role": role, "content": content}, st.sampled_from(["user", "system", "assistant", "tool", "developer"]), garbage),
    garbage,
)
MESSAGES = FieldSpec(
    st.lists(valid_message, min_size=1, max_size=3),
    st.one_of(
        st.just([]),
        st.builds(lambda good, bad, i: good[:i] + [bad] + good[i:], st.lists(valid_message, max_size=2), invalid_message, st.integers(0, 2)),
        garbage,
    ),
)
TOOLS = field(
    st.sampled_from([[TOOL], [TOOL, NOOP_TOOL]]),
    st.one_of(
        st.sampled_from(
            [
                [],
                [{}],
                [{"type": "function"}],
                [{"type": "function", "function": {"name": "bad name!"}}],
                [{"type": "function", "function": {"name": "x" * 65}}],
                [{"type": "custom", "custom": {"name": "x"}}],
                [TOOL, TOOL],
                "tools",
            ]
        ),
        st.builds(lambda params: [{"type": "function", "function": {"name": "f", "parameters": params}}], st.one_of(json_schema_invalid, garbage)),
    ),
)
CHAT_MODEL = field(st.just(DEFAULT_MODEL), st.sampled_from(["gpt-17", EMBEDDING_MODEL, "", DEFAULT_MODEL.lower(), f" {DEFAULT_MODEL}"]))

chat_bodies = request_bodies(
    {"model": CHAT_MODEL, "messages": MESSAGES},
    {
        **SAMPLING_FIELDS,
        "max_completion_tokens": MAX_TOKENS,
        "logprobs": boolean,
        "top_logprobs": field(st.integers(0, 20), st.sampled_from([21, -1, "2", 2**64])),
        "tools": TOOLS,
        "tool_choice": field(
            st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
            st.sampled_from(["sometimes", {"type": "function", "function": {"name": "missing_tool"}}, {"type": "function"}, {"type": "allowed_tools"}, 1]),
        ),
        "parallel_tool_calls": boolean,
        "functions": field(st.just([TOOL["function"]]), st.sampled_from([[], [{}], "f"])),
        "function_call": field(st.sampled_from(["none", "auto", {"name": "get_weather"}]), st.sampled_from(["always", {"name": 1}, {}])),
        "chat_template_kwargs": field(
            st.dictionaries(st.sampled_from(["enable_thinking", "foo", "add_generation_prompt", "messages", "tools", "bos_token"]), garbage, max_size=2),
            st.sampled_from([[], "kwargs", 1]),
        ),
        "add_generation_prompt": boolean,
        "continue_final_message": boolean,
        "echo": boolean,
    },
    always={"max_tokens": MAX_TOKENS},
)

completion_bodies = request_bodies(
    {
        "model": field(st.just(DEFAULT_MODEL), st.sampled_from(["gpt-17", EMBEDDING_MODEL])),
        "prompt": field(
            st.one_of(
                any_text.filter(bool),
                st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2),
                CHAT_TOKEN_IDS,
                st.lists(CHAT_TOKEN_IDS, min_size=1, max_size=2),
            ),
            st.sampled_from(["", [], [""], [[]], [-1], [CHAT_VOCAB], [2**40], [2**64], ["a", 1], [[1], "a"], [[1], [-1]], [1.0], [True], "x " * 1100]),
        ),
    },
    {
        **SAMPLING_FIELDS,
        "echo": boolean,
        "logprobs": field(st.integers(0, 5), st.sampled_from([6, -1, True, "2", 2**64])),
        "best_of": field(st.integers(1, 2), st.sampled_from([0, 21, -1, "2"])),
        "suffix": field(short_text),
    },
    always={"max_tokens": FieldSpec(st.sampled_from([1, 1, 1, 0]), MAX_TOKENS.invalid)},  # 0: only with echo
)

embedding_bodies = request_bodies(
    {
        "model": field(st.just(EMBEDDING_MODEL), st.sampled_from([DEFAULT_MODEL, "gpt-17"])),
        "input": field(
            st.one_of(
                any_text.filter(bool),
                st.lists(any_text.filter(bool), min_size=1, max_size=3),
                st.lists(st.integers(0, EMBEDDING_VOCAB - 1), min_size=1, max_size=8),
                st.lists(st.lists(st.integers(0, EMBEDDING_VOCAB - 1), min_size=1, max_size=4), min_size=1, max_size=2),
                st.just("word " * 600),  # past the model's 512 positions: refused unless truncated
            ),
            st.sampled_from(["", [], [""], [[]], [-1], [EMBEDDING_VOCAB], [2**40], [2**64], ["a", 1], [[1], "a"], ["x"] * 2049, [1.5], [True]]),
        ),
    },
    {
        "encoding_format": field(st.sampled_from(["float", "base64"]), st.sampled_from(["int8", "FLOAT", "", 1])),
        "dimensions": field(st.integers(1, 384), st.sampled_from([0, -1, 385, 2**64, "8", 8.0])),
        "user": field(short_text),
        "truncate_prompt_tokens": field(st.sampled_from([-1, 1, 5, 511, 512, 600]), st.sampled_from([0, -2, 2**64, "5"])),
    },
)

TOKENIZE_MODEL = field(st.sampled_from([DEFAULT_MODEL, EMBEDDING_MODEL]), st.sampled_from(["gpt-17", 1]))
tokenize_bodies = st.one_of(
    request_bodies(
        {"prompt": field(any_text)},
        {"model": TOKENIZE_MODEL, "add_special_tokens": boolean, "return_token_strs": boolean},
    ),
    request_bodies(
        {"messages": MESSAGES},
        {
            "model": TOKENIZE_MODEL,
            "add_generation_prompt": boolean,
            "continue_final_message": boolean,
            "add_special_tokens": boolean,
            "chat_template_kwargs": field(st.dictionaries(st.sampled_from(["foo", "messages", "add_generation_prompt"]), garbage, max_size=2)),
            "tools": TOOLS,
        },
    ),
)


# =============================================================================================
# Sending and judging
# =============================================================================================


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[Server]:
    """A server of this module's own, configured as the session's default one: the garbage sent
    here, and the 500s of the pinned bugs (tracebacks in the log, connections closed by uvicorn),
    stay away from the server the other test files share."""
    srv = start_server(
        "fuzz",
        tmp_path_factory.mktemp("heron-fuzz"),
        ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN)],
        env={},
        max_model_len=DEFAULT_MAX_MODEL_LEN,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


# Run before and after all the fuzzing: no example may change another request's result.
_REFERENCE_BODY = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Count to five."}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def fuzz_http(fuzz_server: Server, response_checker: ResponseChecker) -> Iterator[httpx.Client]:
    with make_client(fuzz_server.base_url, response_checker, timeout=REQUEST_TIMEOUT_S) as client:
        before = client.post(CHAT_PATH, json=_REFERENCE_BODY).json()["choices"][0]["message"]["content"]
        yield client
        # Whatever was sent, the engine is alive and answers a greedy request as it did before.
        assert client.get("/health").status_code == 200
        after = client.post(CHAT_PATH, json=_REFERENCE_BODY).json()["choices"][0]["message"]["content"]
        assert after == before


def encode(body: dict[str, Any]) -> bytes:
    # ensure_ascii: lone surrogates travel as \ud800 escapes (valid JSON text, invalid Unicode);
    # allow_nan: NaN / Infinity go out as the bare literals Python's json (and so the server) reads.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def _count_status(status: int) -> None:
    """Tally the statuses for --hypothesis-show-statistics (a no-op outside @given tests)."""
    try:
        event(f"status {status}")
    except InvalidArgument:
        pass


def send(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST the body; (status, JSON body or the list of SSE chunks). Fails on 5xx, hangs and bad errors."""
    content = encode(body)
    try:
        # A fresh connection each time: after an unhandled exception (a 500) uvicorn closes the
        # connection, and the next request on it would fail for the wrong reason.
        headers = {"content-type": "application/json", "connection": "close"}
        with client.stream("POST", path, content=content, headers=headers) as response:
            raw = response.read()
    except httpx.TimeoutException as exc:
        pytest.fail(f"no answer within {REQUEST_TIMEOUT_S:.0f} s ({type(exc).__name__}) to {path} {content[:2000]!r}")
    except httpx.TransportError as exc:
        pytest.fail(f"connection dropped without an answer ({exc!r}) to {path} {content[:2000]!r}")
    status = response.status_code
    _count_status(status)
    where = f"{path} -> {status} for {content[:2000]!r}:\n{raw[:1500]!r}"
    assert status < 500, f"server error: {where}"
    if status != 200:
        assert status in ALLOWED_ERROR_STATUSES, f"unexpected status: {where}"
        assert response.headers.get("content-type", "").startswith("application/json"), where
        error_body = json.loads(raw)
        check_schema(error_body, "ErrorResponse")
        error = error_body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert error["param"] is None or isinstance(error["param"], str), where
        return status, error_body
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        stream = parse_sse(raw)
        assert stream.done, f"stream without [DONE]: {where}"
        for chunk in stream.chunks:
            assert "error" not in chunk, f"error in a 200 stream: {where}"
        return status, stream.chunks
    return status, json.loads(raw)


def check_usage(usage: dict[str, Any], where: str) -> None:
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage.get("completion_tokens", 0), where
    assert usage["prompt_tokens"] >= 0 and usage.get("completion_tokens", 0) >= 0, where


def judge_generation(body: dict[str, Any], status: int, answer: Any, *, chat: bool) -> None:
    if status != 200:
        return
    where = f"{json.dumps(body, allow_nan=True)[:1500]}"
    response_schema = "CreateChatCompletionResponse" if chat else "completion_response"
    chunk_schema = "CreateChatCompletionStreamResponse" if chat else "completion_chunk"
    n = body.get("n") or 1
    if isinstance(answer, list):  # SSE chunks
        assert answer, where
        for chunk in answer:
            check_schema(chunk, chunk_schema)
        usage_chunks = [chunk["usage"] for chunk in answer if chunk.get("usage")]
        for usage in usage_chunks:
            check_usage(usage, where)
        return
    check_schema(answer, response_schema)
    check_usage(answer["usage"], where)
    prompts = 1
    if not chat and isinstance(body["prompt"], list) and body["prompt"] and not isinstance(body["prompt"][0], int):
        prompts = len(body["prompt"])
    assert len(answer["choices"]) == n * prompts, where
    # max_tokens is 1 here (0 only for completions' echo-scoring): at most one token per candidate.
    candidates = max(n, body.get("best_of") or n) * prompts
    assert answer["usage"]["completion_tokens"] <= candidates, where


# =============================================================================================
# Tests
# =============================================================================================


@fuzz_settings(160)
@given(body=chat_bodies)
def test_fuzz_chat_completions(fuzz_http: httpx.Client, body: dict[str, Any]):
    status, answer = send(fuzz_http, CHAT_PATH, body)
    judge_generation(body, status, answer, chat=True)


@fuzz_settings(130)
@given(body=completion_bodies)
def test_fuzz_completions(fuzz_http: httpx.Client, body: dict[str, Any]):
    status, answer = send(fuzz_http, COMPLETIONS_PATH, body)
    judge_generation(body, status, answer, chat=False)


@fuzz_settings(100)
@given(body=embedding_bodies)
def test_fuzz_embeddings(fuzz_http: httpx.Client, body: dict[str, Any]):
    status, answer = send(fuzz_http, EMBEDDINGS_PATH, body)
    if status != 200:
        return
    check_schema(answer, "embedding_response")
    usage = answer["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0, answer["usage"]
    dimensions = body.get("dimensions") or 384
    for item in answer["data"]:
        if isinstance(item["embedding"], list):
            assert len(item["embedding"]) == dimensions
            assert all(math.isfinite(x) for x in item["embedding"])


@fuzz_settings(100)
@given(body=tokenize_bodies)
def test_fuzz_tokenize(fuzz_http: httpx.Client, body: dict[str, Any]):
    status, answer = send(fuzz_http, TOKENIZE_PATH, body)
    if status != 200:
        return
    assert answer["count"] == len(answer["tokens"]), answer
    assert isinstance(answer["max_model_len"], int) and answer["max_model_len"] > 0, answer
    assert all(isinstance(t, int) and t >= 0 for t in answer["tokens"]), answer
    if answer.get("token_strs") is not None:
        assert len(answer["token_strs"]) == answer["count"], answer


# =============================================================================================
# Bugs the fuzzing found (fixed), pinned
# =============================================================================================


# Bug: text with a lone surrogate (the valid JSON escape \ud800, not valid Unicode) reaches the
# `tokenizers` encoder, which raises TypeError ("TextInputSequence must be str"): 500 internal_error
# on every endpoint that tokenizes, where a 400 invalid_request_error is due.
@pytest.mark.parametrize(
    "path, body",
    [
        (TOKENIZE_PATH, {"model": DEFAULT_MODEL, "prompt": "\ud800"}),
        (TOKENIZE_PATH, {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
        (CHAT_PATH, {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "a\udfff"}], "max_tokens": 1}),
        (COMPLETIONS_PATH, {"model": DEFAULT_MODEL, "prompt": "a\ud800", "max_tokens": 1}),
        (EMBEDDINGS_PATH, {"model": EMBEDDING_MODEL, "input": "\ud800"}),
    ],
    ids=["tokenize_prompt", "tokenize_messages", "chat", "completions", "embeddings"],
)
def test_lone_surrogate_is_a_400(fuzz_http: httpx.Client, response_checker: ResponseChecker, path: str, body: dict[str, Any]):
    status, answer = send(fuzz_http, path, body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error", answer


# Bug: unknown field names are copied verbatim into the X-Heron-Ignored-Fields response header
# (heron/server/app.py `_headers`). A name outside Latin-1 raises UnicodeEncodeError when the
# response is built (500 internal_error); one with CR/LF passes that, but uvicorn refuses the
# header ("Invalid HTTP header value") and drops the connection without any response. Either way
# the field should just be ignored (200), or refused with 400 under --strict-fields.
@pytest.mark.parametrize(
    "path, body",
    [
        (TOKENIZE_PATH, {"model": DEFAULT_MODEL, "prompt": "hi", "\u0100": 1}),
        (EMBEDDINGS_PATH, {"model": EMBEDDING_MODEL, "input": "hi", "名前": 1}),
        (CHAT_PATH, {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x", "日本": 1}], "max_tokens": 1}),
        (CHAT_PATH, {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "a\nb": 1}),
        (COMPLETIONS_PATH, {"model": DEFAULT_MODEL, "prompt": "a", "max_tokens": 1, "stream": True, "x\r\nSet-Cookie: a=b": 1}),
        ("/detokenize", {"model": DEFAULT_MODEL, "tokens": [1], "🦜": 1}),
    ],
    ids=["tokenize_non_latin1", "embeddings_non_latin1", "chat_nested_non_latin1", "chat_newline", "completions_stream_crlf", "detokenize_emoji"],
)
def test_odd_unknown_field_name_is_ignored(fuzz_http: httpx.Client, response_checker: ResponseChecker, path: str, body: dict[str, Any]):
    status, answer = send(fuzz_http, path, body)
    assert status == 200, answer


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


# Bug: JSON that Python's json module reads only to fail deep inside gets 500 internal_error, not
# 400: nesting deeper than the recursion limit raises RecursionError in json.loads, and an integer
# literal over 4300 digits raises ValueError there (heron/server/app.py `_read_json` catches only
# JSONDecodeError and UnicodeDecodeError); chat_template_kwargs nested ~500+ deep parses, then
# overflows the recursion of `_plain` in heron/models/chat_template.py.
@pytest.mark.parametrize(
    "path, content",
    [
        (COMPLETIONS_PATH, "[" * 100_000 + "]" * 100_000),
        (COMPLETIONS_PATH, '{"model": "%s", "prompt": "a", "max_tokens": 1, "x": %s}' % (DEFAULT_MODEL, _nested(5000))),
        (COMPLETIONS_PATH, '{"model": "%s", "prompt": "a", "max_tokens": %s}' % (DEFAULT_MODEL, "9" * 5000)),
        (
            CHAT_PATH,
            '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template_kwargs": %s}'
            % (DEFAULT_MODEL, _nested(800)),
        ),
        (TOKENIZE_PATH, '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": %s}' % _nested(800)),
    ],
    ids=["deep_array", "deep_unknown_field", "int_5000_digits", "chat_template_kwargs_800_deep", "tokenize_kwargs_800_deep"],
)
def test_deep_or_huge_json_is_a_400(fuzz_http: httpx.Client, response_checker: ResponseChecker, path: str, content: str):
    response = fuzz_http.post(path, content=content.encode(), headers={"content-type": "application/json", "connection": "close"})
    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["type"] == "invalid_request_error", response.text[:500]
