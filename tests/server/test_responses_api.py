"""The Responses API (`POST /v1/responses` and its stored-response routes), black-box: through the
official `openai` SDK (create, stream and its accumulator, parse), raw HTTP for the wire format,
and the openai-agents SDK running a tool-calling agent against the server.

Every body is checked against the spec's `Response` (GET too; DELETE's {"id", "object", "deleted"};
input_items' ResponseItemList), and every streamed event against the component of its `type`, its
`event:` name equal to that type and sequence_number counting 0, 1, 2, ... (server_helpers.py).
On top of that, the tests check what the schemas cannot: event order and indices, the accumulated
final response, token counts against /tokenize, the stored-response lifecycle, and that forced
tool calls parse and validate against their tool's parameters.

Greedy decoding and small max_output_tokens keep the runs short and their outputs fixed; tool
calls under `required` or a named tool_choice are grammar-enforced, so they are always well formed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
import uuid
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response
from server_helpers import (
    CHAT_PATH,
    DEFAULT_MODEL,
    RESPONSES_PATH,
    NamedEvent,
    assert_error,
    make_async_openai,
    parse_named_sse,
)

pytestmark = pytest.mark.timeout(120)

PARIS = "What is the capital of France?"
POEM = "Write a short poem about the sea."

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
    "strict": False,
}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["name"]: tool["parameters"] for tool in TOOLS}
QUESTION = "What's the weather in Paris and the time in Tokyo?"


def as_chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """The same function tool in chat's form (Responses flattens chat's `function` object)."""
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def _call_item(call_id: str, city: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": json.dumps({"city": city})}


def _chat_call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


# One conversation in both forms: Responses input items and the chat messages they stand for.
# (The same histories as test_tool_calls.py: with them greedy decoding calls get_weather.)
PARALLEL_ITEMS = [
    {"role": "user", "content": "What's the weather in Paris and in Rome?"},
    _call_item("call_1", "Paris"),
    _call_item("call_2", "Rome"),
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"type": "function_call_output", "call_id": "call_2", "output": "rainy"},
    {"role": "assistant", "content": "Paris is sunny and Rome is rainy."},
    {"role": "user", "content": "What's the weather in London and in Berlin?"},
]
ROUND_TRIP_ITEMS = [
    {"role": "user", "content": "What's the weather in Paris?"},
    _call_item("call_1", "Paris"),
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    {"role": "user", "content": "And what's the weather in London?"},
]
ROUND_TRIP_MESSAGES = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_chat_call("call_1", "Paris")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
    {"role": "user", "content": "And what's the weather in London?"},
]


def create(oai, **kwargs: Any) -> Response:
    kwargs.setdefault("model", DEFAULT_MODEL)
    kwargs.setdefault("temperature", 0)
    return oai.responses.create(**kwargs)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "input": PARIS, "max_output_tokens": 8, "temperature": 0, **fields}


def ok_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:1000]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    return response.json()


def tokenize_count(http: httpx.Client, messages: list[dict[str, Any]], **extra: Any) -> int:
    return ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "messages": messages, **extra}))["count"]


def stream_events(http: httpx.Client, request: dict[str, Any]) -> list[NamedEvent]:
    with http.stream("POST", RESPONSES_PATH, json={**request, "stream": True}) as response:
        raw = response.read()
    assert response.status_code == 200, f"{response.status_code}: {raw[:500]!r}"
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
    events = parse_named_sse(raw)
    assert [e.name for e in events] == [e.data["type"] for e in events]
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    return events


def only_message(response: Response):
    """The single assistant message of a text answer, with its single output_text part."""
    assert [item.type for item in response.output] == ["message"], response.output
    message = response.output[0]
    assert message.role == "assistant"
    assert message.id
    assert [part.type for part in message.content] == ["output_text"], message.content
    return message


def function_calls(response: Response) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def assert_valid_call(call: Any, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """A function_call item as OpenAI shapes it, its arguments valid for its tool; returns them."""
    assert call.type == "function_call"
    assert call.call_id, call
    assert call.id, call
    assert call.status in (None, "completed"), call
    if parameters is None:
        assert call.name in PARAMETERS, f"call to an unknown tool {call.name!r}"
        parameters = PARAMETERS[call.name]
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, parameters)
    return arguments


def assert_usage_adds_up(usage: Any) -> None:
    assert usage is not None
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens == 0


# =============================================================================================
# Text answers
# =============================================================================================


@pytest.fixture(scope="module")
def paris(oai) -> Response:
    """One greedy answer to a string input, shared by the tests that compare with it."""
    return create(oai, input=PARIS, max_output_tokens=16)


def test_create_with_a_string_input(paris, http):
    response = paris
    assert isinstance(response, Response)
    assert response.id.startswith("resp_"), response.id
    assert response.object == "response"
    assert response.model == DEFAULT_MODEL
    assert response.status == "completed", response
    assert response.error is None and response.incomplete_details is None
    assert abs(response.created_at - time.time()) < 300
    assert response.temperature == 0
    assert response.max_output_tokens == 16
    message = only_message(response)
    assert message.status == "completed"
    assert "Paris" in message.content[0].text
    assert response.output_text == message.content[0].text
    assert_usage_adds_up(response.usage)
    assert response.usage.output_tokens <= 16
    # A string input is one user message: the prompt is what /tokenize makes of it.
    assert response.usage.input_tokens == tokenize_count(http, [{"role": "user", "content": PARIS}])


@pytest.mark.parametrize(
    "input_form",
    [
        [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": PARIS}]}],
        [{"role": "user", "content": [{"type": "input_text", "text": PARIS}]}],
        [{"role": "user", "content": PARIS}],
    ],
    ids=["message_item_input_text", "easy_message_input_text", "easy_message_string"],
)
def test_input_items_equal_the_string_input(oai, paris, input_form):
    response = create(oai, input=input_form, max_output_tokens=16)
    assert response.status == "completed"
    assert response.usage.input_tokens == paris.usage.input_tokens
    assert response.output_text == paris.output_text


def test_instructions_are_a_system_message(oai, http, paris):
    instructions = "You are a geography expert. Answer in one word."
    response = create(oai, input=PARIS, instructions=instructions, max_output_tokens=16)
    assert response.instructions == instructions
    expected = tokenize_count(http, [{"role": "system", "content": instructions}, {"role": "user", "content": PARIS}])
    assert response.usage.input_tokens == expected
    assert response.usage.input_tokens != paris.usage.input_tokens
    assert "Paris" in response.output_text


def test_developer_and_user_messages_as_items(oai, http):
    items = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": PARIS}]
    response = create(oai, input=items, max_output_tokens=16)
    expected = tokenize_count(http, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PARIS}])
    assert response.usage.input_tokens == expected
    assert "Paris" in response.output_text


def test_temperature_zero_is_deterministic(oai):
    first = create(oai, input=POEM, max_output_tokens=12)
    second = create(oai, input=POEM, max_output_tokens=12)
    assert first.output_text and first.output_text == second.output_text
    assert first.id != second.id


def test_max_output_tokens_cuts_the_response(oai):
    response = create(oai, input=POEM, max_output_tokens=3)
    assert response.status == "incomplete", response
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    assert response.output_text  # the text made so far is kept
    assert response.max_output_tokens == 3


def test_usage_reports_cached_prompt_tokens(oai):
    # A prompt no earlier request shares, long enough to fill several KV blocks.
    prompt = f"[{uuid.uuid4().hex}] " + "The quick brown fox jumps over the lazy dog. " * 30
    first = create(oai, input=prompt, max_output_tokens=1)
    second = create(oai, input=prompt, max_output_tokens=1)
    assert first.usage.input_tokens == second.usage.input_tokens > 200
    # The first may reuse the chat template's opening (the default system prompt), no more; the
    # second reuses most of the prompt.
    first_cached = first.usage.input_tokens_details.cached_tokens
    second_cached = second.usage.input_tokens_details.cached_tokens
    assert first_cached < 64, first.usage
    assert second.usage.input_tokens // 2 < second_cached <= second.usage.input_tokens, second.usage
    assert second.usage.total_tokens == second.usage.input_tokens + second.usage.output_tokens


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_parse_with_a_pydantic_text_format(oai):
    response = oai.responses.parse(
        model=DEFAULT_MODEL,
        input="Describe a person named Alice who is 30 years old.",
        text_format=Person,
        temperature=0,
        max_output_tokens=40,
    )
    assert response.status == "completed", response
    assert response.text.format.type == "json_schema"
    parsed = response.output_parsed
    assert isinstance(parsed, Person), response.output_text
    assert Person.model_validate_json(response.output_text) == parsed


# =============================================================================================
# Streaming
# =============================================================================================


def assert_text_stream(events: list[NamedEvent], terminal: str) -> dict[str, Any]:
    """The event order and indices of a streamed one-message text answer; returns the final response."""
    names = [e.name for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done", terminal]
    assert names[:4] == head, names
    assert names[-4:] == tail, names
    middle = names[4:-4]
    assert middle and set(middle) == {"response.output_text.delta"}, names

    created, in_progress = events[0].data["response"], events[1].data["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == []
    final = events[-1].data["response"]
    assert created["id"] == in_progress["id"] == final["id"]

    added = events[2].data
    assert added["output_index"] == 0
    item = added["item"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "in_progress"
    assert item["content"] == []
    item_id = item["id"]
    part_added = events[3].data
    assert (part_added["item_id"], part_added["output_index"], part_added["content_index"]) == (item_id, 0, 0)
    assert part_added["part"]["type"] == "output_text" and part_added["part"]["text"] == ""

    deltas = [e.data for e in events[4:-4]]
    for delta in deltas:
        assert (delta["item_id"], delta["output_index"], delta["content_index"]) == (item_id, 0, 0), delta
    text = "".join(d["delta"] for d in deltas)
    assert text

    text_done, part_done, item_done = (e.data for e in events[-4:-1])
    assert (text_done["item_id"], text_done["output_index"], text_done["content_index"]) == (item_id, 0, 0)
    assert text_done["text"] == text
    assert (part_done["item_id"], part_done["output_index"], part_done["content_index"]) == (item_id, 0, 0)
    assert part_done["part"]["type"] == "output_text" and part_done["part"]["text"] == text
    assert item_done["output_index"] == 0 and item_done["item"]["id"] == item_id
    assert [p["text"] for p in item_done["item"]["content"]] == [text]

    assert len(final["output"]) == 1 and final["output"][0]["id"] == item_id
    assert [p["text"] for p in final["output"][0]["content"]] == [text]
    return final


def test_stream_event_order_and_indices(http, paris, response_checker):
    checked = response_checker.counts.copy()
    events = stream_events(http, body(max_output_tokens=16))
    # The transport checked each event against its own component, as it streamed past.
    deltas = sum(e.name == "response.output_text.delta" for e in events)
    assert response_checker.counts["ResponseTextDeltaEvent"] - checked["ResponseTextDeltaEvent"] == deltas
    assert response_checker.counts["ResponseCompletedEvent"] - checked["ResponseCompletedEvent"] == 1
    final = assert_text_stream(events, "response.completed")
    assert final["status"] == "completed"
    # Streamed and not, greedy decoding gives the same text and counts.
    assert final["output"][0]["content"][0]["text"] == paris.output_text
    assert final["usage"]["input_tokens"] == paris.usage.input_tokens
    assert final["usage"]["output_tokens"] == paris.usage.output_tokens
    assert final["usage"]["total_tokens"] == final["usage"]["input_tokens"] + final["usage"]["output_tokens"]
    # A streamed response is stored too (store defaults to true), as it ended.
    assert ok_json(http.get(f"{RESPONSES_PATH}/{final['id']}")) == final


def test_stream_cut_by_max_output_tokens_ends_incomplete(http):
    events = stream_events(http, body(input=POEM, max_output_tokens=3))
    final = assert_text_stream(events, "response.incomplete")
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 3


def test_sdk_stream_helper_accumulates_the_response(oai, paris):
    with oai.responses.stream(model=DEFAULT_MODEL, input=PARIS, max_output_tokens=16, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas
    # The SDK keeps a running snapshot of the text; it must end as the whole text.
    snapshots = [event.snapshot for event in events if event.type == "response.output_text.delta"]
    assert snapshots[-1] == "".join(deltas)
    assert final.output_text == "".join(deltas) == paris.output_text
    assert final.status == "completed"
    assert_usage_adds_up(final.usage)


# =============================================================================================
# Function tools
# =============================================================================================


@pytest.fixture(scope="module")
def required_call(oai) -> Response:
    return create(oai, input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=40)


def test_tool_choice_required_makes_a_valid_call(required_call):
    response = required_call
    assert response.status == "completed", response
    calls = function_calls(response)
    assert calls, response.output
    assert all(item.type == "function_call" for item in response.output), response.output
    for call in calls:
        assert_valid_call(call)
    assert len({call.call_id for call in calls}) == len(calls)
    assert response.tool_choice == "required"
    assert [tool.name for tool in response.tools] == ["get_weather", "get_time"]


def test_named_tool_choice_calls_that_tool(oai):
    response = create(
        oai, input=QUESTION, tools=TOOLS, tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=30
    )
    calls = function_calls(response)
    assert [call.name for call in calls] == ["get_time"], response.output
    assert_valid_call(calls[0])


def test_tool_choice_none_answers_in_text(oai):
    response = create(oai, input=QUESTION, tools=TOOLS, tool_choice="none", max_output_tokens=8)
    assert function_calls(response) == []
    assert only_message(response).content[0].text.strip()


def test_tool_choice_auto_is_consistent(oai):
    response = create(oai, input=QUESTION, tools=TOOLS, tool_choice="auto", max_output_tokens=24)
    calls = function_calls(response)
    if calls:
        for call in calls:
            assert_valid_call(call)
    else:
        assert response.output_text
    assert response.usage.output_tokens <= 24


def test_input_items_render_like_the_equivalent_chat_messages(oai, http):
    # function_call / function_call_output items are the chat form's tool_calls / tool messages:
    # same prompt, so (greedy) the same answer: a call of get_weather.
    response = create(oai, input=ROUND_TRIP_ITEMS, tools=[WEATHER], max_output_tokens=40)
    chat = ok_json(
        http.post(
            CHAT_PATH,
            json={"model": DEFAULT_MODEL, "messages": ROUND_TRIP_MESSAGES, "tools": [as_chat_tool(WEATHER)],
                  "temperature": 0, "max_tokens": 40},
        )
    )
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]
    chat_calls = chat["choices"][0]["message"]["tool_calls"]
    assert chat_calls, chat  # (the premise: with this history the model calls the tool)
    calls = function_calls(response)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in chat_calls
    ]
    for call in calls:
        assert_valid_call(call)


def test_parallel_tool_calls_false_gives_at_most_one_call(oai):
    parallel = create(oai, input=PARALLEL_ITEMS, tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    assert len(function_calls(parallel)) == 2, parallel.output  # the same request calls twice...
    single = create(
        oai, input=PARALLEL_ITEMS, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_output_tokens=60
    )
    calls = function_calls(single)
    assert len(calls) == 1, single.output  # ...but only once when parallel calls are off
    assert_valid_call(calls[0])
    assert single.parallel_tool_calls is False


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


def test_required_with_a_pydantic_tool_with_defs(oai):
    # A nested model and an Enum put $defs and $refs in the (strict) parameters.
    tool = openai.pydantic_responses_function_tool(GetWeather, name="get_weather")
    assert "$defs" in tool["parameters"] and tool["strict"] is True
    response = oai.responses.parse(
        model=DEFAULT_MODEL,
        input="What's the weather in Paris, France?",
        tools=[tool],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    (call,) = function_calls(response)
    assert call.name == "get_weather"
    arguments = assert_valid_call(call, tool["parameters"])
    assert set(arguments["place"]) == {"city", "country"}
    assert isinstance(call.parsed_arguments, GetWeather)
    assert call.parsed_arguments == GetWeather.model_validate(arguments)


def test_function_call_stream(http, required_call):
    request = body(input=QUESTION, tools=TOOLS, tool_choice="required", max_output_tokens=40)
    events = stream_events(http, request)
    names = [e.name for e in events]
    assert names[:2] == ["response.created", "response.in_progress"], names
    assert names[-1] == "response.completed", names
    assert not any(name.startswith("response.output_text") for name in names), names
    final = events[-1].data["response"]
    expected = [item for item in final["output"] if item["type"] == "function_call"]
    assert expected, final["output"]

    # Per call: output_item.added, arguments deltas, arguments done, output_item.done, in order.
    for output_index, call in enumerate(final["output"]):
        assert call["type"] == "function_call", final["output"]
        mine = [e for e in events if e.data.get("output_index") == output_index]
        kinds = [e.name for e in mine]
        assert kinds[0] == "response.output_item.added", kinds
        assert kinds[-2:] == ["response.function_call_arguments.done", "response.output_item.done"], kinds
        assert set(kinds[1:-2]) <= {"response.function_call_arguments.delta"}, kinds
        added = mine[0].data["item"]
        assert added["type"] == "function_call" and added["status"] == "in_progress"
        assert (added["id"], added["call_id"], added["name"]) == (call["id"], call["call_id"], call["name"])
        for event in mine[1:-1]:
            assert event.data["item_id"] == call["id"], event.data
        arguments = "".join(e.data["delta"] for e in mine[1:-2])
        assert arguments == mine[-2].data["arguments"] == mine[-1].data["item"]["arguments"] == call["arguments"]
        jsonschema.validate(json.loads(arguments), PARAMETERS[call["name"]])
    # The calls' events do not interleave: each call's events are one contiguous run.
    indices = [e.data["output_index"] for e in events if "output_index" in e.data]
    assert indices == sorted(indices), indices

    # Streamed and not, greedy decoding gives the same calls.
    assert [(c["name"], c["arguments"]) for c in expected] == [(c.name, c.arguments) for c in function_calls(required_call)]


def test_sdk_stream_accumulates_function_calls(oai, required_call):
    with oai.responses.stream(
        model=DEFAULT_MODEL, input=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_output_tokens=40
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    calls = function_calls(final)
    assert "".join(deltas) == "".join(call.arguments for call in calls)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in function_calls(required_call)]
    for call in calls:
        assert_valid_call(call)


# =============================================================================================
# Stored responses: retrieve, input_items, delete, previous_response_id
# =============================================================================================


def test_stored_response_can_be_retrieved(http):
    created = ok_json(http.post(RESPONSES_PATH, json=body(metadata={"run": "42"})))
    assert created["store"] is True  # the default
    assert created["metadata"] == {"run": "42"}
    retrieved = ok_json(http.get(f"{RESPONSES_PATH}/{created['id']}"))
    assert retrieved == created


def test_sdk_retrieve(oai, paris):
    retrieved = oai.responses.retrieve(paris.id)
    assert retrieved.id == paris.id
    assert retrieved.output_text == paris.output_text
    assert retrieved.usage == paris.usage


def test_input_items_lists_the_input(http):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": PARIS}]},
    ]
    created = ok_json(http.post(RESPONSES_PATH, json=body(input=items)))
    listing = ok_json(http.get(f"{RESPONSES_PATH}/{created['id']}/input_items", params={"order": "asc"}))
    assert listing["object"] == "list" and listing["has_more"] is False
    data = listing["data"]
    assert [(item["type"], item["role"]) for item in data] == [("message", "developer"), ("message", "user")]
    assert [[part["text"] for part in item["content"]] for item in data] == [["Be brief."], [PARIS]]
    assert all(part["type"] == "input_text" for item in data for part in item["content"])
    ids = [item["id"] for item in data]
    assert all(ids) and len(set(ids)) == 2
    assert (listing["first_id"], listing["last_id"]) == (ids[0], ids[-1])
    # The spec's default order is `desc`: newest first.
    newest_first = ok_json(http.get(f"{RESPONSES_PATH}/{created['id']}/input_items"))
    assert [item["id"] for item in newest_first["data"]] == ids[::-1]


def test_input_items_of_a_string_input(oai, paris):
    listing = oai.responses.input_items.list(paris.id)
    (item,) = listing.data
    assert item.type == "message" and item.role == "user"
    assert [(part.type, part.text) for part in item.content] == [("input_text", PARIS)]


def test_delete_then_retrieve_is_404(http):
    created = ok_json(http.post(RESPONSES_PATH, json=body(max_output_tokens=2)))
    path = f"{RESPONSES_PATH}/{created['id']}"
    assert ok_json(http.delete(path)) == {"id": created["id"], "object": "response", "deleted": True}
    assert_error(http.get(path), 404)
    assert_error(http.get(f"{path}/input_items"), 404)
    assert_error(http.delete(path), 404)
    assert_error(http.post(RESPONSES_PATH, json=body(previous_response_id=created["id"])), 400, param="previous_response_id")


def test_sdk_delete_then_retrieve_raises_not_found(oai):
    created = create(oai, input=PARIS, max_output_tokens=2)
    oai.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        oai.responses.retrieve(created.id)
    assert caught.value.status_code == 404


def test_unknown_response_id_is_404(http):
    assert_error(http.get(f"{RESPONSES_PATH}/resp_{uuid.uuid4().hex}"), 404)
    assert_error(http.delete(f"{RESPONSES_PATH}/resp_{uuid.uuid4().hex}"), 404)
    assert_error(http.get(f"{RESPONSES_PATH}/resp_{uuid.uuid4().hex}/input_items"), 404)


def test_store_false_is_not_kept(http):
    created = ok_json(http.post(RESPONSES_PATH, json=body(store=False, max_output_tokens=2)))
    assert created["store"] is False
    assert_error(http.get(f"{RESPONSES_PATH}/{created['id']}"), 404)
    # OpenAI: 400 "Previous response with id '...' not found.", param previous_response_id.
    error = assert_error(
        http.post(RESPONSES_PATH, json=body(previous_response_id=created["id"])), 400, param="previous_response_id"
    )
    assert created["id"] in error["message"]


def test_unknown_previous_response_id_is_400(http):
    missing = f"resp_{uuid.uuid4().hex}"
    error = assert_error(http.post(RESPONSES_PATH, json=body(previous_response_id=missing)), 400, param="previous_response_id")
    assert missing in error["message"]


def test_previous_response_id_continues_after_a_function_call(oai):
    # Turn 1: a forced call. Turn 2: only its output, chained by previous_response_id.
    first = create(oai, input="What's the weather in Paris?", tools=[WEATHER], tool_choice="required", max_output_tokens=40)
    (call,) = function_calls(first)
    assert_valid_call(call)
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    second = create(
        oai, previous_response_id=first.id, input=[output], tools=[WEATHER], tool_choice="none", max_output_tokens=16
    )
    assert second.previous_response_id == first.id
    assert function_calls(second) == []
    assert only_message(second).content[0].text.strip()
    # The chained prompt holds the first turn (its input and its call) and the new output, exactly
    # as if the whole conversation had been sent again without the chain. (Not compared with the
    # first turn's count: with tool_choice "none" the tools may stay out of the prompt.)
    replay = create(
        oai,
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            output,
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=16,
        store=False,
    )
    assert replay.usage.input_tokens == second.usage.input_tokens
    assert replay.output_text == second.output_text


def test_previous_response_id_chains_text_turns(oai):
    # The first turn's instructions are not carried over (OpenAI: "the instructions from a
    # previous response will not be carried over to the next response").
    first = create(oai, input="My name is Zorblax.", instructions="Be terse.", max_output_tokens=8)
    second = create(oai, previous_response_id=first.id, input="What is my name?", max_output_tokens=12)
    assert second.status in ("completed", "incomplete")
    assert second.instructions is None
    assert second.usage.input_tokens > first.usage.input_tokens
    replay = create(
        oai,
        input=[
            {"role": "user", "content": "My name is Zorblax."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        max_output_tokens=12,
        store=False,
    )
    assert replay.usage.input_tokens == second.usage.input_tokens
    assert replay.output_text == second.output_text


# =============================================================================================
# Requests that must fail
# =============================================================================================


@pytest.mark.parametrize(
    ("fields", "status", "param", "code"),
    [
        ({"tools": [{"type": "web_search"}]}, 400, "tools*", ...),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["x"]}]}, 400, "tools*", ...),
        ({"tools": [WEATHER, {"type": "code_interpreter", "container": {"type": "auto"}}]}, 400, "tools*", ...),
        (
            {"input": [{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"},
            ]}]},
            400, "input*", ...,
        ),
        ({"model": None}, 400, "model", ...),
        ({"model": "gpt-17"}, 404, "model", "model_not_found"),
        ({"temperature": 3}, 400, "temperature", ...),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, 400, "tool_choice*", ...),
        ({"max_output_tokens": 0}, 400, "max_output_tokens", ...),
        ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}, 400, "input*", ...),
        ({"previous_response_id": 5}, 400, "previous_response_id", ...),
        ({"max_output_tokens": 2000}, 400, ("input", "max_output_tokens"), "context_length_exceeded"),
    ],
    ids=["web_search", "file_search", "code_interpreter", "input_image", "missing_model", "unknown_model",
         "temperature_3", "named_tool_not_in_tools", "max_output_tokens_0", "output_for_an_unknown_call",
         "previous_response_id_number", "context_overflow"],
)
def test_invalid_request(http, fields, status, param, code):
    request = body(**fields)
    if fields.get("model", "") is None:
        del request["model"]
    assert_error(http.post(RESPONSES_PATH, json=request), status, param=param, code=code)


def test_a_bad_streamed_request_fails_before_the_stream(http):
    # The error is the JSON envelope with its status, not an SSE stream.
    response = http.post(RESPONSES_PATH, json=body(stream=True, tools=[{"type": "web_search"}]))
    assert_error(response, 400, param="tools*")


def test_unknown_fields_are_named_in_the_ignored_fields_header(http):
    request = body(foo=1, store=True, instructions="Be brief.", tools=[WEATHER], tool_choice="none", metadata={})
    response = http.post(RESPONSES_PATH, json=request)
    ok_json(response)
    named = {f.strip() for f in response.headers.get("x-heron-ignored-fields", "").split(",") if f.strip()}
    assert "foo" in named, named
    assert not named & {"model", "input", "store", "instructions", "tools", "tool_choice", "metadata",
                        "max_output_tokens", "temperature"}, named


def test_responses_require_the_api_key(strict_server, anon_strict_http, strict_http):
    request = {"model": strict_server.model, "input": "Hi", "max_output_tokens": 2}
    assert_error(anon_strict_http.post(RESPONSES_PATH, json=request), 401)
    created = ok_json(strict_http.post(RESPONSES_PATH, json=request))
    assert_error(anon_strict_http.get(f"{RESPONSES_PATH}/{created['id']}"), 401)
    assert_error(anon_strict_http.delete(f"{RESPONSES_PATH}/{created['id']}"), 401)
    assert ok_json(strict_http.get(f"{RESPONSES_PATH}/{created['id']}"))["id"] == created["id"]


def test_unknown_model_is_404_as_on_chat(http):
    chat = assert_error(
        http.post(CHAT_PATH, json={"model": "gpt-17", "messages": [{"role": "user", "content": "Hi"}]}), 404
    )
    responses = assert_error(http.post(RESPONSES_PATH, json=body(model="gpt-17")), 404)
    assert (responses["type"], responses["param"], responses["code"]) == (chat["type"], chat["param"], chat["code"])


def test_built_in_tool_error_through_the_sdk(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        create(oai, input=PARIS, tools=[{"type": "web_search"}], max_output_tokens=4)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.param, str) and caught.value.param.startswith("tools")


# =============================================================================================
# The openai-agents SDK
# =============================================================================================


class Location(pydantic.BaseModel):
    city: str
    country: str


def test_openai_agents_runs_a_function_tool(server, response_checker):
    import agents  # openai-agents, pinned in the `test` extra (imported here: only this test needs it)

    agents.set_tracing_disabled(True)
    calls: list[Location] = []

    @agents.function_tool
    def get_weather(location: Location) -> str:
        """Get the current weather in a place."""
        calls.append(location)
        return f"Sunny, 21 C in {location.city}, {location.country}"

    async def run() -> Any:
        client = make_async_openai(server.base_url, response_checker)
        try:
            agent = agents.Agent(
                name="weather",
                instructions="Answer weather questions with the get_weather tool.",
                tools=[get_weather],
                model=agents.OpenAIResponsesModel(model=DEFAULT_MODEL, openai_client=client),
                model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
                tool_use_behavior="stop_on_first_tool",
            )
            return await agents.Runner.run(agent, "What's the weather in Paris, France?", max_turns=2)
        finally:
            await client.close()

    before = response_checker.counts["Response"]
    result = asyncio.run(run())
    assert response_checker.counts["Response"] > before  # the agent's requests went through the checker
    assert len(calls) == 1, calls
    (location,) = calls
    assert isinstance(location, Location) and location.city and location.country
    jsonschema.validate({"location": location.model_dump()}, get_weather.params_json_schema)
    assert result.final_output == f"Sunny, 21 C in {location.city}, {location.country}"
    # The model's one response was a function_call item for that tool.
    (raw,) = result.raw_responses
    (call,) = [item for item in raw.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert Location.model_validate(json.loads(call.arguments)["location"]) == location


# ---------------------------------------------------------------------------------------------
# --responses-store PATH: stored responses outlive a restart
# ---------------------------------------------------------------------------------------------


def test_sqlite_store_keeps_responses_across_a_restart(tmp_path):
    from server_helpers import start_server, stop_server

    store = tmp_path / "responses.sqlite"
    args = ["--max-model-len", "512", "--responses-store", str(store)]
    first = start_server("store-1", tmp_path, args, env={})
    try:
        created = httpx.post(
            f"{first.base_url}{RESPONSES_PATH}",
            json={"model": DEFAULT_MODEL, "input": PARIS, "max_output_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert created.status_code == 200, created.text
        body = created.json()
    finally:
        assert stop_server(first) is None
    assert store.exists()

    second = start_server("store-2", tmp_path, args, env={})
    try:
        again = httpx.get(f"{second.base_url}{RESPONSES_PATH}/{body['id']}", timeout=30)
        assert again.status_code == 200, again.text
        assert again.json() == body
        items = httpx.get(f"{second.base_url}{RESPONSES_PATH}/{body['id']}/input_items", timeout=30).json()
        assert [item["content"][0]["text"] for item in items["data"]] == [PARIS]
        # And the conversation continues from it on the new process.
        follow = httpx.post(
            f"{second.base_url}{RESPONSES_PATH}",
            json={
                "model": DEFAULT_MODEL, "input": "And of Italy?", "previous_response_id": body["id"],
                "max_output_tokens": 8, "temperature": 0,
            },
            timeout=60,
        )
        assert follow.status_code == 200, follow.text
        assert follow.json()["previous_response_id"] == body["id"]
        assert follow.json()["usage"]["input_tokens"] > body["usage"]["input_tokens"] + body["usage"]["output_tokens"]
    finally:
        assert stop_server(second) is None


def test_request_timeout_fails_a_stream_with_error_and_response_failed(tmp_path):
    # Past the first byte the status is sent: a Responses stream reports the failure as an `error`
    # event and a `response.failed` carrying it, and the engine request is stopped.
    from server_helpers import start_server, stop_server

    srv = start_server("timeout", tmp_path, ["--max-model-len", "512", "--request-timeout", "1"], env={})
    try:
        long_request = {
            "model": DEFAULT_MODEL, "input": POEM, "max_output_tokens": 400, "ignore_eos": True, "temperature": 0,
        }
        with httpx.stream("POST", f"{srv.base_url}{RESPONSES_PATH}", json={**long_request, "stream": True}, timeout=60) as s:
            assert s.status_code == 200
            events = parse_named_sse(s.read())
        names = [event.name for event in events]
        assert names[:2] == ["response.created", "response.in_progress"]
        assert "response.output_text.delta" in names  # it was running when the deadline came
        assert names[-2:] == ["error", "response.failed"], names
        assert events[-2].data["code"] == "request_timeout"
        failed = events[-1].data["response"]
        assert failed["status"] == "failed" and "--request-timeout" in failed["error"]["message"]
        assert [event.data["sequence_number"] for event in events] == list(range(len(events)))
        # Not streamed: a 408 in OpenAI's envelope.
        collected = httpx.post(f"{srv.base_url}{RESPONSES_PATH}", json=long_request, timeout=60)
        assert_error(collected, 408, code="request_timeout")
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{srv.base_url}/health", timeout=5).json())["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (health["running"], health["waiting"]) == (0, 0), health
        # A failed response is not stored.
        assert httpx.get(f"{srv.base_url}{RESPONSES_PATH}/{failed['id']}", timeout=10).status_code == 404
    finally:
        assert stop_server(srv) is None
