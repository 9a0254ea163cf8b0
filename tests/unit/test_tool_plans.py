"""The server's tool-calling logic without a model: plans, constraints, prompts and call extraction.

Checked here: every tool_choice form (and the legacy functions form) maps onto the right plan;
the JSON Schemas that enforce `required` and named choices accept exactly the calls they should
(validated with jsonschema); templates that know tools get them through `tools=` and keep the
history's calls, templates that do not get the injected instruction and the history as text; the
extractor turns text into calls with OpenAI ids, drops a call cut short, and honours
parallel_tool_calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from heron.models.chat_template import ChatTemplate
from heron.server.errors import APIError
from heron.server.protocol import ChatCompletionRequest
from heron.server.tool_calls import (
    ToolCallExtractor,
    ToolPlan,
    conversation_for_template,
    legacy_messages,
    plan_tools,
    tool_constraint,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: takes no arguments
USER = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


@pytest.mark.parametrize(
    "fields, mode, named, parallel, legacy",
    [
        ({"tools": [WEATHER, TIME]}, "auto", None, True, False),
        ({"tools": [WEATHER, TIME], "tool_choice": "auto"}, "auto", None, True, False),
        ({"tools": [WEATHER, TIME], "tool_choice": "required"}, "required", None, True, False),
        ({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}, "required", None, False, False),
        ({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "named", "get_time", True, False),
        ({"functions": [WEATHER["function"]]}, "auto", None, False, True),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}, "named", "get_weather", False, True),
    ],
)
def test_plan(fields, mode, named, parallel, legacy):
    plan = plan_tools(request(**fields), "hermes")
    assert (plan.mode, plan.named, plan.parallel, plan.legacy) == (mode, named, parallel, legacy)
    assert plan.names[0] == "get_weather"


@pytest.mark.parametrize(
    "fields",
    [{}, {"tools": [WEATHER], "tool_choice": "none"}, {"functions": [WEATHER["function"]], "function_call": "none"}],
)
def test_no_plan_when_no_tool_may_be_called(fields):
    assert plan_tools(request(**fields), "hermes") is None


def test_allowed_tools_narrow_the_tools():
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice), "hermes")
    assert plan.mode == "required" and plan.names == ["get_time"]
    bad = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]}}
    with pytest.raises(APIError) as caught:
        plan_tools(request(tools=[WEATHER], tool_choice=bad), "hermes")
    assert caught.value.param == "tool_choice"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools[0].function.parameters"),
        ({"functions": [{"name": "f", "parameters": {"type": "string"}}]}, "functions[0].parameters"),
    ],
)
def test_plan_errors_name_the_field(fields, param):
    with pytest.raises(APIError) as caught:
        plan_tools(request(**fields), "hermes")
    assert caught.value.status == 400 and caught.value.param == param


def test_named_constraint_is_the_closed_arguments_schema():
    plan = plan_tools(request(tools=[WEATHER, PING], tool_choice={"type": "function", "function": {"name": "get_weather"}}), "hermes")
    schema = tool_constraint(plan).json
    jsonschema.validate({"city": "Paris"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris", "invented": 1}, schema)  # closed: no invented keys
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, schema)
    ping = plan_tools(request(tools=[WEATHER, PING], tool_choice={"type": "function", "function": {"name": "ping"}}), "hermes")
    jsonschema.validate({}, tool_constraint(ping).json)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": 1}, tool_constraint(ping).json)


def test_required_constraint_accepts_lists_of_offered_calls():
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"), "hermes")
    schema = tool_constraint(plan).json
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}], schema)
    for bad in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_weather", "arguments": {}}], {"name": "get_time", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tool_constraint(plan_tools(request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), "hermes")).json
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}], single)
    assert tool_constraint(plan_tools(request(tools=[WEATHER]), "hermes")) is None  # auto is not constrained


SEARCH_HOTELS = {  # the shape pydantic gives a model with a nested model: $defs and a $ref
    "type": "function",
    "function": {
        "name": "search_hotels",
        "parameters": {
            "$defs": {"F": {"type": "object", "properties": {"max_price": {"type": "number"}}}},
            "type": "object",
            "properties": {"city": {"type": "string"}, "filters": {"$ref": "#/$defs/F"}},
            "required": ["city", "filters"],
        },
    },
}
TREE = {  # recursive through the root
    "type": "function",
    "function": {
        "name": "plant",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["name"],
        },
    },
}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_keeps_each_tools_refs_pointing_into_its_own_schema(parallel):
    plan = plan_tools(request(tools=[WEATHER, SEARCH_HOTELS, TREE], tool_choice="required", parallel_tool_calls=parallel), "hermes")
    schema = tool_constraint(plan).json
    good = [
        {"name": "search_hotels", "arguments": {"city": "Rome", "filters": {"max_price": 120}}},
        {"name": "plant", "arguments": {"name": "oak", "children": [{"name": "acorn", "children": []}]}},
    ]
    for call in good:
        jsonschema.validate([call], schema)  # a ref resolving against the wrapper would raise here
    for bad in (
        {"name": "search_hotels", "arguments": {"city": "Rome", "filters": {"max_price": "cheap"}}},
        {"name": "search_hotels", "arguments": {"city": "Rome", "filters": {"max_price": 1, "stars": 5}}},  # nested, closed
        {"name": "plant", "arguments": {"name": "oak", "children": [{"children": []}]}},  # the recursion checks too
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([bad], schema)
    assert SEARCH_HOTELS["function"]["parameters"]["properties"]["filters"] == {"$ref": "#/$defs/F"}  # the request is not changed


def test_nested_objects_are_closed_unless_they_compose_their_keys():
    parameters = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
            "nested": {"type": "object", "properties": {"a": {"type": "string"}}},
            "listed": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            "parts": {"allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}},
                {"type": "object", "properties": {"b": {"type": "string"}}},
            ]},
            "either": {"anyOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}},
                {"type": "string"},
            ]},
            "data": {"type": "object", "const": {"properties": {"x": 1}, "type": "object"}},
        },
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    schema = tool_constraint(plan_tools(request(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}), "hermes")).json
    jsonschema.validate({"open": {"a": "x", "more": 1}, "parts": {"a": "x", "b": "y"}}, schema)
    for invented in ({"nested": {"a": "x", "b": 1}}, {"listed": [{"b": 1}]}, {"either": {"b": 1}}, {"x": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invented, schema)
    assert schema["properties"]["data"]["const"] == {"properties": {"x": 1}, "type": "object"}  # data is not a schema


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "And Rome?"},
]


def test_template_with_tool_support_gets_tools_and_history():
    template = ChatTemplate((FIXTURES / "qwen2_5_instruct.jinja").read_text())
    assert template.supports_tools
    plan = ToolPlan([WEATHER], "auto", None, True, False, "hermes")
    messages, tools = conversation_for_template(HISTORY, plan, template.supports_tools)
    assert tools == [WEATHER] and messages == HISTORY
    prompt = template.render(messages, tools=tools, add_generation_prompt=True)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_template_without_tool_support_gets_the_instruction_and_text_history():
    plan = ToolPlan([WEATHER], "auto", None, True, False, "hermes")
    messages, tools = conversation_for_template(HISTORY, plan, False)
    assert tools is None
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>[" in messages[0]["content"]
    # The format's example is a real call of the first tool, not placeholders a model would copy.
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "example"}}]</tool_call>' in messages[0]["content"]
    assert "<function name>" not in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'}
    assert messages[3] == {"role": "user", "content": "Function result: sunny"}
    # A system message of the caller's own is kept, with the instruction after it.
    with_system, _ = conversation_for_template([{"role": "system", "content": "Be brief."}, *HISTORY], plan, False)
    assert with_system[0]["content"].startswith("Be brief.\n\n") and len(with_system) == len(HISTORY) + 1
    # tool_choice none: no instruction, but the history is still written out.
    no_tools, _ = conversation_for_template(HISTORY, None, False)
    assert no_tools[0] == HISTORY[0] and no_tools[1]["content"].startswith("<tool_call>")


def test_legacy_function_messages_become_tool_messages():
    converted = legacy_messages(
        [
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ]
    )
    call_id = converted[0]["tool_calls"][0]["id"]
    assert converted[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert converted[1] == {"role": "tool", "name": "get_weather", "tool_call_id": call_id, "content": "sunny"}


def extract(plan: ToolPlan, pieces: list[str]):
    extractor = ToolCallExtractor(plan)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        text, new = extractor.feed(piece, final=i == len(pieces) - 1)
        content += text
        calls += new
    return content, calls


def test_extractor_named_required_and_auto():
    named = ToolPlan([WEATHER], "named", "get_weather", True, False, "hermes")
    content, calls = extract(named, ['{"city"', ': "Oslo"}'])
    assert content == "" and [(i, c.name, json.loads(c.arguments)) for i, _, c in calls] == [(0, "get_weather", {"city": "Oslo"})]
    assert calls[0][1].startswith("call_") and len(calls[0][1]) == 29
    content, calls = extract(named, ['{"city": "Os'])  # cut short by max_tokens
    assert calls == [] and content == '{"city": "Os'

    required = ToolPlan([WEATHER, TIME], "required", None, True, False, "hermes")
    text = '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {}}]'
    _, calls = extract(required, [text[:30], text[30:]])
    assert [c.name for _, _, c in calls] == ["get_weather", "get_time"] and [i for i, _, _ in calls] == [0, 1]
    assert len({call_id for _, call_id, _ in calls}) == 2

    auto = ToolPlan([WEATHER], "auto", None, True, False, "hermes")
    content, calls = extract(auto, ["Let me check.\n<tool_", 'call>[{"name": "get_weather", "arguments": {"city": "B"}}]</tool_call>'])
    assert content == "Let me check." and calls[0][2].name == "get_weather"


def test_extractor_keeps_only_the_first_call_without_parallel_calls():
    for plan in (ToolPlan([WEATHER], "auto", None, False, False, "hermes"), ToolPlan([WEATHER], "auto", None, True, True, "hermes")):
        text = '<tool_call>[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"city": "B"}}]</tool_call>'
        _, calls = extract(plan, [text])
        assert [json.loads(c.arguments)["city"] for _, _, c in calls] == ["A"]
