"""Tool calling through the official `openai` SDK, black-box: every tool_choice, parallel calls,
the legacy `functions` / `function_call` form, streaming, max_tokens inside a call, and a tool-result
round trip checked against /tokenize.

The bundled SmolLM2 template knows no tools, so Heron writes the tools and any history calls into
the prompt as text; `required` and a named choice are grammar-enforced, `auto` relies on the
model. The prompts below were picked so greedy decoding gives the calls named in the asserts.
Every call's arguments are parsed and validated against its tool's parameters with jsonschema;
every body and chunk is checked against OpenAI's spec by the client's transport (conftest.py).
"""

from __future__ import annotations

import enum
import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
from server_helpers import DEFAULT_MODEL, summarize_stream

pytestmark = pytest.mark.timeout(120)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

QUESTION = [{"role": "user", "content": "What's the weather in Paris and the time in Tokyo?"}]


def _call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


# A few-shot history with two parallel calls: `required` then calls twice for two cities.
PARALLEL_HISTORY = [
    {"role": "user", "content": "What's the weather in Paris and in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "Paris"), _call("call_2", "Rome")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rainy"},
    {"role": "assistant", "content": "Paris is sunny and Rome is rainy."},
    {"role": "user", "content": "What's the weather in London and in Berlin?"},
]
# A completed tool round trip: with it, `auto` (not enforced) makes the call by itself. (Asked
# "What's the weather in London?" instead, the bundled model with the CPU kernels' int8 activations
# writes a malformed call, named "London", which the server rightly leaves in the content; with
# float32 activations it calls get_weather either way.)
ROUND_TRIP_HISTORY = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "Paris")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    {"role": "user", "content": "And what's the weather in London?"},
]
# A round trip whose assistant said something before calling: `auto` then answers with text and
# a call, the text in `content`.
TEXT_THEN_CALL_HISTORY = [
    ROUND_TRIP_HISTORY[0],
    {"role": "assistant", "content": "Let me check the weather for you.", "tool_calls": [_call("call_1", "Paris")]},
    *ROUND_TRIP_HISTORY[2:],
]
# The same conversation in the deprecated form: `function_call` and a `role: "function"` result.
LEGACY_ROUND_TRIP_HISTORY = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
    {"role": "function", "name": "get_weather", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    ROUND_TRIP_HISTORY[-1],
]

# Streamed and not, with greedy decoding: the named calls are what the model gives for each.
SCENARIOS: dict[str, dict[str, Any]] = {
    "required": dict(messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=40),
    "named": dict(
        messages=QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=30
    ),
    "parallel": dict(messages=PARALLEL_HISTORY, tools=[WEATHER], tool_choice="required", max_tokens=60),
    "auto_history": dict(messages=ROUND_TRIP_HISTORY, tools=[WEATHER], max_tokens=40),
    "auto_text_then_call": dict(messages=TEXT_THEN_CALL_HISTORY, tools=[WEATHER], max_tokens=50),
    "legacy_named": dict(
        messages=QUESTION, functions=[WEATHER["function"], TIME["function"]], function_call={"name": "get_weather"}, max_tokens=30
    ),
}
EXPECTED_CALLS = {
    "required": [("get_weather", {"city": "Paris"})],
    "named": [("get_time", {})],
    "parallel": [("get_weather", {"city": "London"}), ("get_weather", {"city": "Berlin"})],
    "auto_history": [("get_weather", {"city": "London"})],
    "auto_text_then_call": [("get_weather", {"city": "London"})],
}


def chat(oai, **kwargs: Any):
    return oai.chat.completions.create(model=DEFAULT_MODEL, temperature=0, **kwargs)


def assert_valid_call(call_id: str | None, call_type: str | None, name: str, arguments: str) -> dict[str, Any]:
    """One call as OpenAI shapes it, its arguments valid for its tool; returns the arguments."""
    assert call_id is not None and call_id.startswith("call_") and len(call_id) > len("call_"), call_id
    assert call_type == "function", call_type
    assert name in PARAMETERS, f"call to an unknown tool {name!r}"
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, PARAMETERS[name])
    return parsed


def assert_valid_calls(tool_calls) -> list[tuple[str, dict[str, Any]]]:
    """Every call valid, ids distinct; returns [(name, arguments)]."""
    assert tool_calls, "no tool calls"
    out = [(c.function.name, assert_valid_call(c.id, c.type, c.function.name, c.function.arguments)) for c in tool_calls]
    assert len({c.id for c in tool_calls}) == len(tool_calls), f"call ids repeat: {[c.id for c in tool_calls]}"
    return out


def assert_expected(calls: list[tuple[str, dict[str, Any]]], expected: list[tuple[str, dict[str, Any]]]) -> None:
    """Same tools in the same order, each with at least the expected argument values."""
    assert [name for name, _ in calls] == [name for name, _ in expected], calls
    for (_, arguments), (_, want) in zip(calls, expected):
        assert arguments.items() >= want.items(), f"{arguments} lacks {want}"


@pytest.fixture(scope="module")
def unstreamed(oai):
    """The non-streamed completion of each scenario, made once (the stream tests compare with it)."""
    cache: dict[str, Any] = {}

    def get(scenario: str):
        if scenario not in cache:
            cache[scenario] = chat(oai, **SCENARIOS[scenario])
        return cache[scenario]

    return get


# =============================================================================================
# tool_choice
# =============================================================================================


def test_tool_choice_none_answers_in_text(oai):
    completion = chat(oai, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8)
    choice = completion.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.function_call is None
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")


def test_auto_without_history_is_consistent(oai):
    # Whatever the model does, the message and finish_reason must agree with each other.
    completion = chat(oai, messages=QUESTION, tools=TOOLS, max_tokens=8)
    choice = completion.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls"
    else:
        assert isinstance(choice.message.content, str) and choice.message.content
        assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8


@pytest.mark.parametrize("scenario", ["auto_history", "auto_text_then_call", "required", "named", "parallel"])
def test_tool_calls(unstreamed, scenario):
    completion = unstreamed(scenario)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    if scenario == "auto_text_then_call":
        # The text before the call is the content, without the call's markup.
        assert choice.message.content == "Let me check the weather for you.", choice.message.content
    else:
        assert choice.message.content is None, choice.message.content
    assert choice.message.function_call is None
    calls = assert_valid_calls(choice.message.tool_calls)
    assert_expected(calls, EXPECTED_CALLS[scenario])


def test_parallel_tool_calls_false_gives_one_call(oai, unstreamed):
    assert len(unstreamed("parallel").choices[0].message.tool_calls) == 2  # the same request calls twice...
    completion = chat(oai, **SCENARIOS["parallel"], parallel_tool_calls=False)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = assert_valid_calls(choice.message.tool_calls)
    assert len(calls) == 1, calls  # ...but only once when parallel calls are off
    assert_expected(calls, [("get_weather", {"city": "London"})])


def test_legacy_functions_with_named_function_call(unstreamed):
    completion = unstreamed("legacy_named")
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None
    assert choice.message.content is None
    call = choice.message.function_call
    assert call is not None and call.name == "get_weather"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, PARAMETERS["get_weather"])
    assert arguments["city"] == "Paris"


def test_legacy_function_role_history_renders_like_tool_messages(oai, unstreamed):
    # `role: "function"` and `function_call` in history are accepted and render exactly like the
    # tool_calls / tool form of the same conversation: the prompts are the same length.
    completion = chat(oai, messages=LEGACY_ROUND_TRIP_HISTORY, functions=[WEATHER["function"]], max_tokens=1)
    assert completion.usage.prompt_tokens == unstreamed("auto_history").usage.prompt_tokens
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.function_call is None and choice.message.tool_calls is None


def test_sdk_parse_with_a_strict_pydantic_tool(oai):
    class GetWeather(pydantic.BaseModel):
        """Get the current weather in a city"""

        city: str

    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    assert tool["function"]["strict"] is True
    completion = oai.chat.completions.parse(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What's the weather in Zürich?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=20,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert_valid_call(call.id, call.type, "get_weather", call.function.arguments)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert call.function.parsed_arguments.city == "Zürich"  # non-ASCII arguments survive intact


def test_required_with_a_pydantic_tool_whose_schema_uses_defs(oai):
    # A nested model and an Enum put `$defs` and `$ref`s in the parameters (as openai-agents'
    # @function_tool, LiteLLM and LlamaIndex send them): `required` nests each tool inside one
    # wrapper schema, where those refs must still resolve.
    class Unit(str, enum.Enum):
        celsius = "celsius"
        fahrenheit = "fahrenheit"

    class Place(pydantic.BaseModel):
        city: str
        country: str

    class GetWeather(pydantic.BaseModel):
        """Get the current weather in a place"""

        place: Place
        unit: Unit

    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    assert "$defs" in tool["function"]["parameters"]
    completion = chat(
        oai, messages=[{"role": "user", "content": "What's the weather in Paris, France?"}],
        tools=[tool], tool_choice="required", max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    GetWeather.model_validate(arguments)  # what the SDK's parse would do with it
    assert set(arguments["place"]) == {"city", "country"}  # the nested object is closed too


@pytest.mark.parametrize("parallel", [True, False])
def test_required_with_a_schema_recursive_through_its_root(oai, parallel):
    # `#` inside a tool's parameters means that tool's own root, not the wrapper's.
    plant = {"type": "object", "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
             "required": ["name", "children"]}
    tool = {"type": "function", "function": {"name": "plant", "description": "Plant a tree of plants", "parameters": plant}}
    completion = chat(
        oai, messages=[{"role": "user", "content": "Plant an oak with two acorns."}],
        tools=[tool], tool_choice="required", parallel_tool_calls=parallel, max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "plant"
    jsonschema.validate(json.loads(call.function.arguments), plant)


# =============================================================================================
# Streaming
# =============================================================================================


def check_tool_call_stream(chunks: list[dict[str, Any]], *, forced: bool) -> tuple[str, list[dict[str, Any]]]:
    """The chunk-sequence rules of a streamed tool-calling answer (one choice); returns its
    content and its calls.

    Each call opens with a delta carrying its index, id, type and function.name (arguments
    empty); the deltas after it carry only the index and argument text. Content text may come
    before the first call, never once calls are being sent; the choice ends exactly once, with
    "tool_calls". A forced choice (`required` / named) opens with `content: null`, as OpenAI's
    does, and sends no text at all.
    """
    choices, _ = summarize_stream(chunks, chat=True, include_usage=False)  # role first, one finish...
    assert list(choices) == [0], list(choices)
    calls: list[dict[str, Any]] = []
    finishes: list[str] = []
    for position, chunk in enumerate(chunks):
        (c,) = chunk["choices"]
        delta = c["delta"]
        if c.get("finish_reason") is not None:
            finishes.append(c["finish_reason"])
        if position == 0 and forced:
            assert "content" in delta and delta["content"] is None, f"a forced call opens with content: {delta}"
        if calls:
            assert not delta.get("content"), f"content text sent after the calls began: {chunk}"
        assert delta.get("function_call") is None, f"legacy function_call delta in a tools answer: {chunk}"
        for tool_delta in delta.get("tool_calls") or []:
            function = tool_delta.get("function") or {}
            if tool_delta["index"] == len(calls):  # a new call: the header delta
                assert tool_delta.get("id", "").startswith("call_"), tool_delta
                assert tool_delta.get("type") == "function", tool_delta
                assert function.get("name") in PARAMETERS, tool_delta
                assert function.get("arguments") in ("", None), f"a call's first delta carries arguments: {tool_delta}"
                calls.append({"id": tool_delta["id"], "name": function["name"], "arguments": ""})
            else:  # the current call's arguments
                assert tool_delta["index"] == len(calls) - 1, f"delta for call {tool_delta['index']} while call {len(calls) - 1} is open"
                assert tool_delta.get("id") is None and tool_delta.get("type") is None, f"id/type repeated: {tool_delta}"
                assert function.get("name") is None, f"name repeated: {tool_delta}"
                assert isinstance(function.get("arguments"), str), tool_delta
                calls[-1]["arguments"] += function["arguments"]
    content = choices[0].text
    if forced:
        assert content == "", f"a forced call streamed content {content!r}"
    assert "<tool_call>" not in content and "[{" not in content, f"call markup leaked into content: {content!r}"
    assert finishes == ["tool_calls"], f"finish reasons: {finishes}"
    assert calls, "no calls streamed"
    for call in calls:
        assert_valid_call(call["id"], "function", call["name"], call["arguments"])
    assert len({call["id"] for call in calls}) == len(calls), calls
    return content, calls


@pytest.mark.parametrize("scenario", ["required", "named", "parallel", "auto_history", "auto_text_then_call"])
def test_tool_call_stream(oai, unstreamed, scenario):
    # The SDK's streaming helper: its raw chunks (as received) for the sequence rules, and its
    # accumulator for the rebuilt message; both must agree with the non-streamed answer.
    with oai.chat.completions.stream(model=DEFAULT_MODEL, temperature=0, **SCENARIOS[scenario]) as stream:
        chunks = [event.chunk.to_dict(mode="json") for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    forced = not scenario.startswith("auto")
    content, streamed = check_tool_call_stream(chunks, forced=forced)
    reference = unstreamed(scenario).choices[0].message
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in reference.tool_calls]
    assert content == (reference.content or "")

    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    if forced:
        assert choice.message.content is None, choice.message.content
    else:
        # `auto` cannot know at the role delta whether calls will follow, so (like vLLM) it opens
        # with content "" where the unstreamed answer may say null.
        assert (choice.message.content or None) == reference.content, choice.message.content
    accumulated = choice.message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in accumulated] == [
        (c["id"], c["name"], c["arguments"]) for c in streamed
    ]
    assert_expected(assert_valid_calls(accumulated), EXPECTED_CALLS[scenario])


def test_legacy_function_call_stream(oai, unstreamed):
    reference = unstreamed("legacy_named").choices[0].message.function_call
    stream = chat(oai, **SCENARIOS["legacy_named"], stream=True)
    chunks = [chunk.to_dict(mode="json") for chunk in stream]
    choices, _ = summarize_stream(chunks, chat=True, include_usage=False)
    assert choices[0].finish_reason == "function_call"
    assert choices[0].text == ""
    deltas = [c["choices"][0]["delta"].get("function_call") for c in chunks if c["choices"]]
    deltas = [d for d in deltas if d]
    assert deltas[0].get("name") == "get_weather", deltas
    assert all(d.get("name") is None for d in deltas[1:]), deltas
    assert all(c["choices"][0]["delta"].get("tool_calls") is None for c in chunks), "tool_calls in a legacy answer"
    arguments = "".join(d.get("arguments") or "" for d in deltas)
    assert arguments == reference.arguments
    jsonschema.validate(json.loads(arguments), PARAMETERS["get_weather"])


# =============================================================================================
# max_tokens inside a call
# =============================================================================================


def test_max_tokens_inside_a_call_reports_no_call(oai):
    kwargs = dict(messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=5)
    choice = chat(oai, **kwargs).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None

    chunks = [chunk.to_dict(mode="json") for chunk in chat(oai, **kwargs, stream=True)]
    choices, _ = summarize_stream(chunks, chat=True, include_usage=False)
    assert choices[0].finish_reason == "length"
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]), "a cut-short call was streamed"
    assert choices[0].text == (choice.message.content or "")  # streamed and not say the same


# =============================================================================================
# A tool-result round trip, and /tokenize agreeing with the prompt the chat request used
# =============================================================================================


def test_tool_result_round_trip_matches_tokenize(oai, http, unstreamed):
    # Answer the model's own call with a result, by its id, and ask again.
    call = unstreamed("auto_history").choices[0].message.tool_calls[0]
    messages = [
        *ROUND_TRIP_HISTORY,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "cloudy, 15 C"},
    ]
    completion = chat(oai, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=6)
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
    else:
        assert choice.message.content

    response = http.post("/tokenize", json={"model": DEFAULT_MODEL, "messages": messages, "tools": [WEATHER]})
    assert response.status_code == 200, response.text
    assert response.json()["count"] == completion.usage.prompt_tokens
    # ...and the tools are part of that prompt.
    without_tools = http.post("/tokenize", json={"model": DEFAULT_MODEL, "messages": messages})
    assert without_tools.status_code == 200, without_tools.text
    assert without_tools.json()["count"] < completion.usage.prompt_tokens
