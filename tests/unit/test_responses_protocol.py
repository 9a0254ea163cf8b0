"""/v1/responses protocol (heron.server.protocol.responses) against OpenAI's rules and its OpenAPI spec.

Requests: valid bodies parse losslessly and are valid for OpenAI's own CreateResponse schema; invalid
bodies fail with the `param` and message the caller will see (through heron.server.errors, the one
error mapper). Conversion: Responses input (plus a stored history) becomes the chat request the chat
path serves, with tool calls and their results paired by id. Responses: every model dump is
validated against the matching component of openai-openapi.yaml and its null rules pinned. Pure
Python, no model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_schema import SPEC_PATH, assert_matches, schema_errors, spec_available
from pydantic import BaseModel, ValidationError

from heron.server.errors import validation_error
from heron.server.protocol import (
    ChatCompletionAllowedToolChoiceParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    IncompleteDetails,
    InputTokensDetails,
    OutputRefusal,
    OutputText,
    OutputTextLogprob,
    OutputTextTopLogprob,
    ReasoningText,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseError,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseObject,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    input_items,
    to_chat_request,
)

requires_spec = pytest.mark.skipif(not spec_available(), reason=f"OpenAI spec not found at {SPEC_PATH}")

MODEL = "heron-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
CALL_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}
TEXT_PART = {"type": "input_text", "text": "What is this?"}
WEATHER_REF = {"type": "function", "name": "get_weather"}
OUT_OF_TOKENS = IncompleteDetails(reason="max_output_tokens")
ASSISTANT_OUTPUT_MESSAGE = {
    "type": "message",
    "role": "assistant",
    "id": "msg_prev",
    "status": "completed",
    "content": [{"type": "output_text", "text": "It is 18C.", "annotations": [], "logprobs": []}],
}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Hi", **fields}


def allowed(mode: str, *tools: dict[str, Any]) -> dict[str, Any]:
    return {"type": "allowed_tools", "mode": mode, "tools": list(tools)}


def parse(payload: dict[str, Any]) -> ResponseCreateRequest:
    # The JSON path, as the server reads a body.
    return ResponseCreateRequest.model_validate_json(json.dumps(payload))


def api_error(payload: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of the 400 the caller would get for this body."""
    with pytest.raises(ValidationError) as info:
        parse(payload)
    error = validation_error(info.value, payload)
    return error.param, error.message


def dumped(model: BaseModel) -> dict[str, Any]:
    return json.loads(model.model_dump_json())


# =============================================================================================
# Requests
# =============================================================================================

# Each: a body, and the spec errors it is known to raise through no fault of its own (quirks of
# openai-openapi.yaml, named below), so that any other spec error fails the test.
# Quirk "oneOf": a message with list content matches both EasyInputMessage and Item/InputMessage,
# and the spec's InputItem is a oneOf (a validator ignores its discriminator).
ONE_OF = "is valid under each of"
VALID = {
    "string_input": (body(), None),
    "message_without_type": (body(input=[{"role": "user", "content": "Hi"}]), None),
    "message_with_type": (body(input=[{"type": "message", "role": "developer", "content": "Be brief."}]), None),
    "message_parts": (
        body(input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]),
        ONE_OF,
    ),
    "assistant_history_and_tools": (
        body(
            input=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Weather in Paris?"},
                CALL,
                CALL_OUTPUT,
                ASSISTANT_OUTPUT_MESSAGE,
                {"role": "user", "content": "Thanks"},
            ],
            tools=[WEATHER],
        ),
        None,
    ),
    "function_call_output_parts": (
        body(
            input=[CALL, {**CALL_OUTPUT, "output": [{"type": "input_text", "text": "18C"}]}],
            tools=[WEATHER],
        ),
        None,
    ),
    "reasoning_item_sent_back": (body(input=[{"type": "reasoning", "id": "rs_1", "summary": []}]), None),
    "maximal": (
        body(
            instructions="Answer in French.",
            previous_response_id="resp_abc",
            max_output_tokens=64,
            temperature=0.7,
            top_p=0.9,
            top_logprobs=3,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            text={"format": {"type": "json_object"}, "verbosity": "low"},
            stream=True,
            stream_options={"include_obfuscation": False},
            store=False,
            metadata={"team": "ml", "run": "7"},
            user="user-1234",
            truncation="auto",
            include=["message.output_text.logprobs"],
            reasoning={"effort": "low"},
            seed=42,
        ),
        None,
    ),
    "tool_choice_function": (body(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}), None),
    "tool_choice_allowed_tools": (
        body(
            tools=[WEATHER],
            tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [WEATHER_REF]},
        ),
        None,
    ),
    "tool_choice_none_without_tools": (body(tool_choice="none"), None),
    "json_schema_format": (
        body(
            text={
                "format": {
                    "type": "json_schema",
                    "name": "city-answer_1",
                    "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "description": "An answer",
                    "strict": True,
                }
            }
        ),
        None,
    ),
    "text_format_text": (body(text={"format": {"type": "text"}}), None),
    "nullable_fields_null": (
        body(
            instructions=None,
            max_output_tokens=None,
            temperature=None,
            top_p=None,
            previous_response_id=None,
            store=None,
            stream=None,
            truncation=None,
            reasoning=None,
        ),
        None,
    ),
    "vllm_extras": (body(top_k=40, min_p=0.05, repetition_penalty=1.1, stop=["\n\n"], ignore_eos=False), None),
}


@pytest.mark.parametrize("payload", [v[0] for v in VALID.values()], ids=VALID.keys())
def test_valid_request_parses_losslessly(payload: dict[str, Any]) -> None:
    request = parse(payload)
    assert request.model_dump(by_alias=True, exclude_unset=True) == payload
    assert request.unknown_fields() == []


@requires_spec
@pytest.mark.parametrize(("payload", "quirk"), VALID.values(), ids=VALID.keys())
def test_valid_request_is_valid_for_openai(payload: dict[str, Any], quirk: str | None) -> None:
    errors = schema_errors(payload, "CreateResponse")
    if quirk is None:
        assert errors == []
    else:
        assert errors and all(quirk in error for error in errors), errors


def test_request_fields_and_defaults() -> None:
    request = parse(VALID["maximal"][0])
    assert request.tools[0].name == "get_weather"
    assert request.tools[0].parameters["required"] == ["city"]
    assert request.metadata == {"team": "ml", "run": "7"}
    assert request.wants_logprobs()
    minimal = parse(body())
    assert (minimal.store, minimal.stream, minimal.tools, minimal.tool_choice) == (True, False, None, None)
    assert (minimal.temperature, minimal.max_output_tokens, minimal.instructions) == (None, None, None)
    assert not minimal.wants_logprobs()
    schema = parse(VALID["json_schema_format"][0]).text.format
    assert schema.name == "city-answer_1" and schema.schema_["properties"] == {"city": {"type": "string"}}


def test_lenient_text_parts_and_undeclared_fields() -> None:
    # input_text in an assistant message or output_text in a user one is text all the same.
    request = parse(
        body(
            input=[
                {"role": "assistant", "content": [{"type": "input_text", "text": "Earlier"}]},
                {"role": "user", "content": [{"type": "output_text", "text": "Quoted"}]},
            ],
            service_tier="auto",
            tool_choice=None,  # not nullable in the spec; null reads as "not given"
        )
    )
    assert [item.role for item in request.input] == ["assistant", "user"]
    # OpenAI fields with no meaning here are listed, not silently dropped.
    assert request.unknown_fields() == ["service_tier"]


# Each: a body, the param the caller is told about, and a piece of the message.
INVALID = {
    "missing_model": ({"input": "Hi"}, "model", "Missing required parameter"),
    "input_number": (body(input=5), "input", "expected a string or an array"),
    "web_search_tool": (
        body(tools=[{"type": "web_search"}]),
        "tools[0].type",
        "built-in tool 'web_search' is not supported",
    ),
    "file_search_second_tool": (
        body(tools=[WEATHER, {"type": "file_search", "vector_store_ids": ["vs_1"]}]),
        "tools[1].type",
        "built-in tool 'file_search' is not supported by this server",
    ),
    "web_search_preview_tool": (body(tools=[{"type": "web_search_preview"}]), "tools[0].type", "'web_search_preview'"),
    "computer_use_tool": (
        body(tools=[{"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "linux"}]),
        "tools[0].type",
        "not supported by this server",
    ),
    "code_interpreter_tool": (body(tools=[{"type": "code_interpreter"}]), "tools[0].type", "not supported"),
    "image_generation_tool": (body(tools=[{"type": "image_generation"}]), "tools[0].type", "not supported"),
    "mcp_tool": (body(tools=[{"type": "mcp", "server_label": "x"}]), "tools[0].type", "built-in tool 'mcp'"),
    "local_shell_tool": (body(tools=[{"type": "local_shell"}]), "tools[0].type", "built-in tool 'local_shell'"),
    "unknown_tool_type": (body(tools=[{"type": "teleport"}]), "tools[0].type", "Invalid tool type: 'teleport'"),
    "tool_without_name": (body(tools=[{"type": "function"}]), "tools[0].name", "Missing required parameter"),
    "tool_name_with_space": (body(tools=[{"type": "function", "name": "get weather"}]), "tools[0].name", "pattern"),
    "chat_style_tool": (
        body(tools=[{"type": "function", "function": {"name": "get_weather"}}]),
        "tools[0].name",
        "Missing required parameter",
    ),
    "image_part": (
        body(input=[{"role": "user", "content": [TEXT_PART, {"type": "input_image", "image_url": "https://x/a.png"}]}]),
        "input[0].content[1]",
        "Image input ('input_image') is not supported by this server",
    ),
    "file_part": (
        body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]),
        "input[0].content[0]",
        "File input",
    ),
    "audio_part": (
        body(input=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        "input[0].content[0]",
        "Audio input",
    ),
    "image_in_function_output": (
        body(input=[CALL, {**CALL_OUTPUT, "output": [{"type": "input_image", "image_url": "u"}]}]),
        "input[1].output[0]",
        "Image input",
    ),
    "chat_style_text_part": (
        body(input=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
        "input[0].content[0].type",
        "Invalid value: 'text'",
    ),
    "unknown_role": (body(input=[{"role": "robot", "content": "Hi"}]), "input[0].role", "Invalid value: 'robot'"),
    "tool_role_message": (body(input=[{"role": "tool", "content": "18C"}]), "input[0].role", "Invalid value: 'tool'"),
    "message_without_content": (body(input=[{"role": "user"}]), "input[0].content", "Missing required parameter"),
    "unknown_item_type": (body(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]", "'item_reference'"),
    "function_call_without_arguments": (
        body(input=[{"type": "function_call", "call_id": "c", "name": "f"}]),
        "input[0].arguments",
        "Missing required parameter",
    ),
    "function_call_output_without_call_id": (
        body(input=[{"type": "function_call_output", "output": "x"}]),
        "input[0].call_id",
        "Missing required parameter",
    ),
    "function_call_output_empty_call_id": (
        body(input=[{"type": "function_call_output", "call_id": "", "output": "x"}]),
        "input[0].call_id",
        "",
    ),
    "tool_choice_without_tools": (body(tool_choice="required"), "tool_choice", "only allowed when 'tools'"),
    "tool_choice_unknown_function": (
        body(tools=[WEATHER], tool_choice={"type": "function", "name": "get_time"}),
        "tool_choice",
        "'get_time' is not one of the 'tools'",
    ),
    "tool_choice_hosted_tool": (
        body(tools=[WEATHER], tool_choice={"type": "web_search_preview"}),
        "tool_choice.type",
        "built-in tool 'web_search_preview' is not supported",
    ),
    "tool_choice_bad_mode": (
        body(tools=[WEATHER], tool_choice="sometimes"),
        "tool_choice",
        "Invalid value: 'sometimes'",
    ),
    "allowed_tools_unknown_name": (
        body(tools=[WEATHER], tool_choice=allowed("auto", {"type": "function", "name": "nope"})),
        "tool_choice.tools[0].name",
        "'nope' is not one of the 'tools'",
    ),
    "allowed_tools_builtin": (
        body(tools=[WEATHER], tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "mcp"}]}),
        "tool_choice.tools[0].type",
        "built-in tool 'mcp'",
    ),
    "max_output_tokens_zero": (body(max_output_tokens=0), "max_output_tokens", "Expected a value >= 1"),
    "max_output_tokens_string": (body(max_output_tokens="10"), "max_output_tokens", "expected an integer"),
    "temperature_above_2": (body(temperature=2.5), "temperature", "Expected a value <= 2"),
    "top_p_above_1": (body(top_p=1.5), "top_p", "Expected a value <= 1"),
    "top_logprobs_above_20": (body(top_logprobs=21), "top_logprobs", "Expected a value <= 20"),
    "parallel_tool_calls_string": (body(parallel_tool_calls="yes"), "parallel_tool_calls", "expected a boolean"),
    "store_integer": (body(store=1), "store", "expected a boolean"),
    "metadata_17_pairs": (body(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "too many entries"),
    "metadata_value_number": (body(metadata={"a": 1}), "metadata.a", "expected a string"),
    "metadata_long_value": (body(metadata={"a": "v" * 513}), "metadata.a", ""),
    "truncation_bad": (body(truncation="middle"), "truncation", "Invalid value: 'middle'"),
    "include_unknown": (body(include=["everything"]), "include[0]", "Invalid value: 'everything'"),
    "json_schema_without_schema": (
        body(text={"format": {"type": "json_schema", "name": "answer"}}),
        "text.format.schema",
        "Missing required parameter",
    ),
    "json_schema_bad_name": (
        body(text={"format": {"type": "json_schema", "name": "an answer", "schema": {}}}),
        "text.format.name",
        "pattern",
    ),
    "chat_style_json_schema": (
        body(text={"format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}),
        "text.format.name",
        "Missing required parameter",
    ),
    "text_format_unknown": (body(text={"format": {"type": "yaml"}}), "text.format.type", "Invalid value: 'yaml'"),
    "stream_options_without_stream": (
        body(stream_options={"include_obfuscation": True}),
        "stream_options",
        "only allowed when 'stream' is enabled",
    ),
    "background": (body(background=True), "background", "not supported"),
    "conversation": (body(conversation="conv_1"), "conversation", "not supported"),
    "prompt_template": (body(prompt={"id": "pmpt_1"}), "prompt", "not supported"),
    "min_tokens_above_max": (body(max_output_tokens=5, min_tokens=6), "min_tokens", "less than or equal"),
}


@pytest.mark.parametrize(("payload", "param", "message"), INVALID.values(), ids=INVALID.keys())
def test_invalid_request_names_the_parameter(payload: dict[str, Any], param: str, message: str) -> None:
    got_param, got_message = api_error(payload)
    assert got_param == param
    assert message in got_message


def test_unsupported_errors_carry_a_code() -> None:
    # The code rides in the error's ctx beside `param`, for the error mapper to put on the wire.
    with pytest.raises(ValidationError) as info:
        parse(body(tools=[{"type": "web_search"}]))
    (error,) = info.value.errors()
    assert error["type"] == "invalid_request"
    assert error["ctx"] == {"param": "tools[0].type", "code": "unsupported_tool"}


# =============================================================================================
# input_items
# =============================================================================================


def test_string_input_is_one_user_message_item() -> None:
    (item,) = input_items(parse(body(input="Tell me a story")))
    assert item["id"].startswith("msg_") and len(item["id"]) > 20
    assert item == {
        "id": item["id"],
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "Tell me a story"}],
        "status": "completed",
    }


def test_input_items_give_ids_and_resource_shapes() -> None:
    request = parse(
        body(
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"role": "assistant", "content": "Checking."},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                {**CALL, "id": "fc_given"},
                CALL_OUTPUT,
                {"type": "message", "role": "user", "content": "again", "id": "msg_dup"},
                {"type": "message", "role": "user", "content": "and again", "id": "msg_dup"},
                {"type": "reasoning", "summary": []},
            ],
            tools=[WEATHER],
        )
    )
    items = input_items(request)
    assert [item["type"] for item in items] == [
        "message", "message", "message", "function_call", "function_call_output", "message", "message", "reasoning",
    ]
    assert items[0]["content"] == [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]
    # An assistant message is stored in OpenAI's OutputMessage shape.
    assert items[1]["content"] == [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]
    assert items[2]["content"] == [{"type": "refusal", "refusal": "No."}]
    assert items[3] == {**CALL, "id": "fc_given", "status": "completed"}
    assert items[4]["id"].startswith("fco_") and items[4]["output"] == "18C and sunny"
    # Ids are page cursors: a repeated one is replaced.
    assert items[5]["id"] == "msg_dup" and items[6]["id"] != "msg_dup"
    assert items[7]["id"].startswith("rs_")
    assert len({item["id"] for item in items}) == len(items)


@requires_spec
def test_input_items_are_openai_item_resources() -> None:
    request = parse(VALID["assistant_history_and_tools"][0])
    refusal = parse(body(input=[{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]))
    items = input_items(request) + input_items(parse(body())) + input_items(refusal)
    for item in items + input_items(parse(VALID["reasoning_item_sent_back"][0])):
        assert_matches(item, "ItemResource")


# =============================================================================================
# to_chat_request
# =============================================================================================


def chat_messages(chat: ChatCompletionRequest) -> list[dict[str, Any]]:
    return [message.model_dump(exclude_none=True) for message in chat.messages]


def test_string_input_with_instructions() -> None:
    chat = to_chat_request(parse(body(input="Hi", instructions="Be brief.")), [])
    assert isinstance(chat, ChatCompletionRequest)
    assert chat_messages(chat) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.model == MODEL and chat.stream is False and chat.n == 1


def test_function_call_and_output_become_tool_calls_and_tool_message() -> None:
    paris = CALL["arguments"]
    request = parse(body(input=[{"role": "user", "content": "Weather in Paris?"}, CALL, CALL_OUTPUT], tools=[WEATHER]))
    messages = chat_messages(to_chat_request(request, []))
    assert messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": paris}}
            ],
        },
        {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_1"},
    ]
    assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"]


def test_consecutive_calls_share_one_assistant_turn() -> None:
    second = {**CALL, "call_id": "call_2", "arguments": '{"city": "Rome"}'}
    later = {**CALL, "call_id": "call_3", "arguments": '{"city": "Oslo"}'}
    request = parse(
        body(
            input=[
                {"role": "user", "content": "Paris and Rome?"},
                {"role": "assistant", "content": "Let me check both."},
                CALL,
                second,
                CALL_OUTPUT,
                {**CALL_OUTPUT, "call_id": "call_2", "output": [{"type": "input_text", "text": "21C"}]},
                later,
                {"type": "function_call_output", "call_id": "call_3", "output": "5C"},
            ],
            tools=[WEATHER],
        )
    )
    messages = chat_messages(to_chat_request(request, []))
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant", "tool"]
    # The calls right after an assistant message join it; a call after a tool result starts a new turn.
    assert messages[1]["content"] == "Let me check both."
    assert [call["id"] for call in messages[1]["tool_calls"]] == ["call_1", "call_2"]
    assert [call["id"] for call in messages[4]["tool_calls"]] == ["call_3"]
    assert [m["tool_call_id"] for m in messages if m["role"] == "tool"] == ["call_1", "call_2", "call_3"]
    assert messages[3]["content"] == "21C"


def test_history_precedes_input_and_instructions_do_not_carry_over() -> None:
    first = parse(body(input="Weather in Paris?", instructions="Old instructions.", tools=[WEATHER]))
    paris = '{"city":"Paris"}'
    output = [dumped(ResponseFunctionToolCall(call_id="call_9", name="get_weather", arguments=paris))]
    # What the route stores as the first response's conversation: its input items + its output.
    history = input_items(first) + output
    follow_up = parse(
        body(
            previous_response_id="resp_1",
            instructions="New instructions.",
            input=[{"type": "function_call_output", "call_id": "call_9", "output": "18C"}],
            tools=[WEATHER],
        )
    )
    messages = chat_messages(to_chat_request(follow_up, history))
    assert messages == [
        {"role": "system", "content": "New instructions."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": paris}}
            ],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "call_9"},
    ]


def test_output_message_from_a_response_converts_back() -> None:
    message = ResponseOutputMessage(content=[OutputText(text="Bonjour"), OutputText(text="!")])
    history = input_items(parse(body(input="Say hi in French"))) + [dumped(message)]
    messages = chat_messages(to_chat_request(parse(body(input="Again")), history))
    # Text parts are joined as our chat template joins them.
    assert messages[1] == {"role": "assistant", "content": "Bonjour\n!"}
    assert messages[2] == {"role": "user", "content": "Again"}


def test_roles_and_reasoning_items() -> None:
    request = parse(
        body(
            input=[
                {"role": "developer", "content": "Dev rules."},
                {"role": "system", "content": [{"type": "input_text", "text": "Sys"}]},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
                {"role": "user", "content": "Hi"},
            ]
        )
    )
    # Chat has the developer role (the template maps it when it must); reasoning is not prompt text.
    assert chat_messages(to_chat_request(request, [])) == [
        {"role": "developer", "content": "Dev rules."},
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Hi"},
    ]


def test_unmatched_call_id_is_refused_with_its_position() -> None:
    request = parse(body(input=[{"role": "user", "content": "Hi"}, CALL, {**CALL_OUTPUT, "call_id": "call_x"}]))
    with pytest.raises(ValidationError) as info:
        to_chat_request(request, [])
    error = validation_error(info.value, {})
    assert error.status == 400
    assert error.param == "input[2].call_id"
    assert "call_x" in error.message
    # The same output is fine once the call is in the stored history.
    history = [{**CALL, "id": "fc_1", "call_id": "call_x", "status": "completed"}]
    last = chat_messages(to_chat_request(request, history))[-1]
    assert last == {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_x"}


def test_an_output_before_its_call_is_refused() -> None:
    request = parse(body(input=[CALL_OUTPUT, CALL]))
    with pytest.raises(ValidationError) as info:
        to_chat_request(request, [])
    assert validation_error(info.value, {}).param == "input[0].call_id"


def test_nothing_to_answer_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        to_chat_request(parse({"model": MODEL, "input": []}), [])
    assert validation_error(info.value, {}).param == "input"


def test_settings_map_onto_chat() -> None:
    request = parse(
        body(
            max_output_tokens=64,
            temperature=0.3,
            top_p=0.8,
            seed=7,
            user="u1",
            parallel_tool_calls=False,
            include=["message.output_text.logprobs"],
            top_logprobs=2,
            stream=True,
            top_k=5,
            stop=["END"],
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        )
    )
    chat = to_chat_request(request, [])
    assert chat.max_completion_tokens == 64 and chat.requested_max_tokens() == 64
    assert (chat.temperature, chat.top_p, chat.seed, chat.user) == (0.3, 0.8, 7, "u1")
    assert chat.parallel_tool_calls is False
    assert (chat.logprobs, chat.top_logprobs) == (True, 2)
    assert (chat.top_k, chat.stop) == (5, ["END"])
    # The route streams by itself: the chat request never does.
    assert chat.stream is False
    assert chat.tools[0].model_dump(exclude_none=True) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER["parameters"],
            "strict": True,
        },
    }
    assert isinstance(chat.tool_choice, ChatCompletionNamedToolChoiceParam)
    assert chat.tool_choice.function.name == "get_weather"
    json_schema = chat.response_format.json_schema
    assert (json_schema.name, json_schema.schema_, json_schema.strict) == ("w", {"type": "object"}, True)


def test_tool_choice_and_format_variants() -> None:
    chat = to_chat_request(parse(body(tools=[WEATHER], tool_choice=allowed("required", WEATHER_REF))), [])
    assert isinstance(chat.tool_choice, ChatCompletionAllowedToolChoiceParam)
    assert chat.tool_choice.allowed_tools.mode == "required"
    assert chat.tool_choice.allowed_tools.tools == [{"type": "function", "function": {"name": "get_weather"}}]
    assert to_chat_request(parse(body(tools=[WEATHER], tool_choice="none")), []).tool_choice == "none"
    json_mode = to_chat_request(parse(body(text={"format": {"type": "json_object"}})), [])
    assert json_mode.response_format.type == "json_object"
    plain = to_chat_request(parse(body(text={"format": {"type": "text"}})), [])
    assert plain.response_format is None and plain.tools is None and plain.logprobs is False
    # Unset sampling fields stay unset, so the model's generation config applies.
    assert (plain.temperature, plain.top_p, plain.max_completion_tokens) == (None, None, None)


# =============================================================================================
# Responses
# =============================================================================================


def full_response(**fields: Any) -> ResponseObject:
    request = parse(
        body(
            instructions="Be brief.",
            tools=[WEATHER],
            tool_choice="auto",
            text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}, "verbosity": "low"},
            metadata={"k": "v"},
            user="u1",
            reasoning={"effort": "low"},
            top_logprobs=1,
        )
    )
    message = ResponseOutputMessage(
        content=[
            OutputText(
                text="Hi",
                logprobs=[
                    OutputTextLogprob(
                        token="Hi",
                        logprob=-0.25,
                        bytes=[72, 105],
                        top_logprobs=[OutputTextTopLogprob(token="Hi", logprob=-0.25, bytes=[72, 105])],
                    )
                ],
            )
        ]
    )
    call = ResponseFunctionToolCall(name="get_weather", arguments='{"city":"Paris"}')
    reasoning = ResponseReasoningItem(content=[ReasoningText(text="The user greets.")])
    defaults: dict[str, Any] = {
        "status": "completed",
        "completed_at": 1_700_000_001,
        "output": [reasoning, message, call],
        "usage": ResponseUsage(
            input_tokens=10,
            input_tokens_details=InputTokensDetails(cached_tokens=4),
            output_tokens=5,
            total_tokens=15,
        ),
    }
    return ResponseObject.for_request(request, **{**defaults, **fields})


@requires_spec
def test_response_object_matches_spec_in_every_status() -> None:
    assert_matches(dumped(full_response()), "Response")
    incomplete = full_response(status="incomplete", completed_at=None, incomplete_details=OUT_OF_TOKENS)
    assert_matches(dumped(incomplete), "Response")
    failed = ResponseObject(model=MODEL, status="failed", error=ResponseError(message="engine died"))
    assert_matches(dumped(failed), "Response")
    assert_matches(dumped(ResponseObject(model=MODEL)), "Response")  # in_progress, as in response.created


def test_response_object_echoes_the_request_and_keeps_required_nulls() -> None:
    data = dumped(full_response())
    assert data["id"].startswith("resp_") and data["object"] == "response"
    assert (data["status"], data["instructions"], data["user"]) == ("completed", "Be brief.", "u1")
    assert data["metadata"] == {"k": "v"}
    assert data["tools"] == [{**WEATHER, "strict": True}]
    assert data["text"] == {
        "format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}},
        "verbosity": "low",
    }
    assert (data["tool_choice"], data["store"], data["truncation"]) == ("auto", True, "disabled")
    assert data["top_logprobs"] == 1
    assert data["reasoning"] == {"effort": "low"}
    assert data["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    assert [item["type"] for item in data["output"]] == ["reasoning", "message", "function_call"]
    call = data["output"][2]
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_") and call["status"] == "completed"
    # The python dump (what the store keeps) uses the wire names too.
    assert full_response().model_dump()["text"]["format"]["schema"] == {"type": "object"}

    bare = dumped(ResponseObject(model=MODEL))
    required_nullable = ("error", "incomplete_details", "instructions", "previous_response_id", "temperature", "top_p")
    for key in (*required_nullable, "max_output_tokens"):
        assert key in bare and bare[key] is None, key
    # Not nullable in the spec: absent until there is one.
    assert "usage" not in bare and "user" not in bare
    assert bare["tools"] == [] and bare["output"] == [] and bare["parallel_tool_calls"] is True


def test_tool_echo_keeps_nullable_keys() -> None:
    ping = {"type": "function", "name": "ping"}
    request = parse(body(tools=[ping], tool_choice=ping))
    data = dumped(ResponseObject.for_request(request, status="completed"))
    # FunctionTool requires `parameters` and `strict` (nullable); OpenAI echoes the description too.
    assert data["tools"] == [{**ping, "description": None, "parameters": None, "strict": None}]
    assert data["tool_choice"] == {"type": "function", "name": "ping"}
    if spec_available():
        assert_matches(data, "Response")


@requires_spec
def test_output_items_match_spec() -> None:
    message = ResponseOutputMessage(status="incomplete", content=[OutputText(text="Hel"), OutputRefusal(refusal="No.")])
    assert_matches(dumped(message), "OutputMessage")
    assert dumped(message)["content"][0] == {"type": "output_text", "text": "Hel", "annotations": [], "logprobs": []}
    assert_matches(dumped(ResponseFunctionToolCall(name="f", arguments="{}", status="in_progress")), "FunctionToolCall")
    assert_matches(dumped(ResponseReasoningItem(content=[ReasoningText(text="x")])), "ReasoningItem")
    assert_matches(dumped(ResponseUsage(input_tokens=1, output_tokens=2, total_tokens=3)), "ResponseUsage")


def test_deleted_body_is_the_spec_example() -> None:
    assert dumped(ResponseDeleted(id="resp_1")) == {"id": "resp_1", "object": "response", "deleted": True}


def stream_events() -> list[tuple[BaseModel, str]]:
    """One of each event, in the order a streamed text-then-call response sends them."""
    created = ResponseObject(id="resp_1", model=MODEL)
    done = full_response(id="resp_1")
    message = ResponseOutputMessage(id="msg_1", status="in_progress")
    text = OutputText(text="")
    call = ResponseFunctionToolCall(id="fc_1", call_id="call_1", name="get_weather", arguments="", status="in_progress")
    in_message: dict[str, Any] = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    in_reasoning: dict[str, Any] = {"item_id": "rs_1", "output_index": 2, "content_index": 0}
    events: list[tuple[BaseModel, str]] = [
        (ResponseCreatedEvent(sequence_number=0, response=created), "ResponseCreatedEvent"),
        (ResponseInProgressEvent(sequence_number=1, response=created), "ResponseInProgressEvent"),
        (ResponseOutputItemAddedEvent(sequence_number=2, output_index=0, item=message), "ResponseOutputItemAddedEvent"),
        (
            ResponseContentPartAddedEvent(sequence_number=3, part=text, **in_message),
            "ResponseContentPartAddedEvent",
        ),
        (
            ResponseTextDeltaEvent(
                sequence_number=4,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta="Hi",
                logprobs=[OutputTextLogprob(token="Hi", logprob=-0.5, bytes=[72, 105])],
            ),
            "ResponseTextDeltaEvent",
        ),
        (
            ResponseTextDoneEvent(sequence_number=5, item_id="msg_1", output_index=0, content_index=0, text="Hi"),
            "ResponseTextDoneEvent",
        ),
        (
            ResponseContentPartDoneEvent(
                sequence_number=6, item_id="msg_1", output_index=0, content_index=0, part=OutputText(text="Hi")
            ),
            "ResponseContentPartDoneEvent",
        ),
        (
            ResponseOutputItemDoneEvent(
                sequence_number=7,
                output_index=0,
                item=ResponseOutputMessage(id="msg_1", content=[OutputText(text="Hi")]),
            ),
            "ResponseOutputItemDoneEvent",
        ),
        (ResponseOutputItemAddedEvent(sequence_number=8, output_index=1, item=call), "ResponseOutputItemAddedEvent"),
        (
            ResponseFunctionCallArgumentsDeltaEvent(sequence_number=9, item_id="fc_1", output_index=1, delta="{"),
            "ResponseFunctionCallArgumentsDeltaEvent",
        ),
        (
            ResponseFunctionCallArgumentsDoneEvent(
                sequence_number=10, item_id="fc_1", output_index=1, name="get_weather", arguments='{"city":"Paris"}'
            ),
            "ResponseFunctionCallArgumentsDoneEvent",
        ),
        (
            ResponseReasoningTextDeltaEvent(sequence_number=11, delta="Hm", **in_reasoning),
            "ResponseReasoningTextDeltaEvent",
        ),
        (
            ResponseReasoningTextDoneEvent(sequence_number=12, text="Hm", **in_reasoning),
            "ResponseReasoningTextDoneEvent",
        ),
        (ResponseCompletedEvent(sequence_number=13, response=done), "ResponseCompletedEvent"),
        (
            ResponseIncompleteEvent(
                sequence_number=13,
                response=full_response(status="incomplete", incomplete_details=OUT_OF_TOKENS),
            ),
            "ResponseIncompleteEvent",
        ),
        (
            ResponseFailedEvent(
                sequence_number=13,
                response=ResponseObject(model=MODEL, status="failed", error=ResponseError(message="boom")),
            ),
            "ResponseFailedEvent",
        ),
        (ResponseErrorEvent(sequence_number=0, message="Model overloaded"), "ResponseErrorEvent"),
    ]
    return events


@requires_spec
@pytest.mark.parametrize("index", range(len(stream_events())))
def test_stream_event_matches_spec(index: int) -> None:
    event, component = stream_events()[index]
    data = dumped(event)
    assert_matches(data, component)
    # The union every client dispatches on accepts it too.
    assert schema_errors(data, "ResponseStreamEvent") == []


def test_stream_event_shapes() -> None:
    events = [dumped(event) for event, _ in stream_events()]
    assert all(list(event)[:2] == ["type", "sequence_number"] for event in events)
    assert [e["type"] for e in events][:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    delta = events[4]
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]
    assert events[5]["logprobs"] == []  # required even when empty
    error = {"type": "error", "sequence_number": 0, "code": None, "message": "Model overloaded", "param": None}
    assert events[-1] == error
    # A logprob of -inf (a masked token) is clamped: JSON has no -Infinity.
    assert dumped(OutputTextLogprob(token="x", logprob=float("-inf")))["logprob"] == -9999.0


@requires_spec
def test_spec_checks_can_fail() -> None:
    # The validator behind every assertion above really rejects a wrong shape.
    data = dumped(ResponseOutputMessage(content=[OutputText(text="x")]))
    del data["content"][0]["annotations"]
    assert schema_errors(data, "OutputMessage")
    assert schema_errors({"type": "response.output_text.delta", "sequence_number": 1}, "ResponseTextDeltaEvent")


def test_a_history_chat_cannot_read_is_reported_under_input() -> None:
    history = [{"id": "msg_1", "type": "message", "role": "robot", "content": [{"type": "input_text", "text": "x"}]}]
    with pytest.raises(ValidationError) as info:
        to_chat_request(parse(body()), history)
    error = validation_error(info.value, {})
    assert error.status == 400 and error.param == "input"
