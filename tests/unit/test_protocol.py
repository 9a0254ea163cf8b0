"""Protocol models (heron.server.protocol) against OpenAI's rules and OpenAI's own OpenAPI spec.

Requests: a table of valid bodies that must parse losslessly (and that the spec itself accepts), a
table of invalid bodies that must raise ValidationError pointing at the right parameter, and the
unknown-field listing. Responses: every instance built here is dumped to JSON and validated against
the matching component schema of openai-openapi.yaml (`nullable` turned into null unions), and the
null-versus-absent rules are pinned key by key. Pure Python, no model, well under a second after the
spec has loaded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_schema import SPEC_PATH, assert_matches, component, schema_errors, spec_available
from pydantic import BaseModel, ValidationError

from heron.server.protocol import (
    MIN_LOGPROB,
    ChatCompletionChunk,
    ChatCompletionLogprobs,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionTokensDetails,
    CompletionUsage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorDetail,
    ErrorResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TopLogprob,
    tokenize_request_adapter,
)

requires_spec = pytest.mark.skipif(not spec_available(), reason=f"OpenAI spec not found at {SPEC_PATH}")

MODEL = "heron-test"
USER = {"role": "user", "content": "Hi"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", **fields}


def error_params(exc: ValidationError) -> set[str]:
    """The top-level parameter each error is about: loc[0], or ctx["param"] for cross-field checks."""
    params = set()
    for error in exc.errors():
        params.add(error["loc"][0] if error["loc"] else error["ctx"]["param"])
    return params


def dumped(model: BaseModel) -> dict[str, Any]:
    """What goes on the wire: the JSON text, parsed back."""
    return json.loads(model.model_dump_json())


# =============================================================================================
# Chat requests
# =============================================================================================

MAXIMAL_CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {"role": "user", "content": "Weather in Paris?", "name": "ana"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 18C and sunny.", "refusal": None, "name": "bot"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ],
    "max_tokens": 100,
    "max_completion_tokens": 50,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 2,
    "stop": ["\n\n", "END"],
    "presence_penalty": -2,
    "frequency_penalty": 2,
    "logit_bias": {"50256": -100, "11": 100},
    "logprobs": True,
    "top_logprobs": 20,
    "seed": 42,
    "user": "user-1234",
    "stream": True,
    "stream_options": {"include_usage": True},
    "response_format": {"type": "json_object"},
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    # vLLM extensions
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "min_tokens": 5,
    "ignore_eos": False,
    "stop_token_ids": [2, 32000],
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "chat_template_kwargs": {"enable_thinking": False},
    "add_generation_prompt": True,
    "continue_final_message": False,
}

VALID_CHAT = {
    "minimal": chat(),
    "maximal": MAXIMAL_CHAT,
    "system_string": {"model": MODEL, "messages": [{"role": "system", "content": "S"}, USER]},
    "developer_parts": {
        "model": MODEL,
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "D"}]}],
    },
    "user_all_part_types": chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}},
                ],
            }
        ]
    ),
    "assistant_parts_with_refusal": chat(
        messages=[
            USER,
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "No."}, {"type": "refusal", "refusal": "I can't."}],
            },
            USER,
        ]
    ),
    "assistant_tool_calls_without_content": chat(
        messages=[
            USER,
            {"role": "assistant", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
        ],
        tools=[WEATHER_TOOL],
    ),
    "tool_message_parts": chat(
        messages=[USER, {"role": "tool", "content": [{"type": "text", "text": "18C"}], "tool_call_id": "call_1"}]
    ),
    "legacy_functions": chat(
        messages=[
            USER,
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
            {"role": "function", "name": "get_weather", "content": "18C"},
            {"role": "function", "name": "get_weather", "content": None},
        ],
        functions=[{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}],
        function_call={"name": "get_weather"},
    ),
    "legacy_function_call_auto": chat(functions=[{"name": "f"}], function_call="auto"),
    "response_format_text": chat(response_format={"type": "text"}),
    "response_format_json_schema": chat(
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "city-answer_1",
                "description": "An answer",
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": True,
            },
        }
    ),
    "tool_choice_none_without_tools": chat(tool_choice="none"),
    "tool_choice_auto": chat(tools=[WEATHER_TOOL], tool_choice="auto"),
    "tool_choice_required": chat(tools=[WEATHER_TOOL], tool_choice="required"),
    "tool_choice_allowed_tools": chat(
        tools=[WEATHER_TOOL],
        tool_choice={
            "type": "allowed_tools",
            "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
        },
    ),
    "tool_without_parameters": chat(tools=[{"type": "function", "function": {"name": "ping"}}]),
    "stop_string": chat(stop="\n"),
    "stop_four": chat(stop=["a", "b", "c", "d"]),
    "bounds_low": chat(
        temperature=0, top_p=0, presence_penalty=-2.0, frequency_penalty=-2.0, n=1, top_logprobs=0, logprobs=True
    ),
    "bounds_high": chat(temperature=2, top_p=1, n=128, logit_bias={"0": 100, "1": -100}),
    "seed_int64_edges": chat(seed=-(2**63)),
    "stream_without_options": chat(stream=True),
    "stream_options_null_without_stream": chat(stream=False, stream_options=None),
    "nullable_fields_null": chat(
        temperature=None,
        top_p=None,
        n=None,
        stop=None,
        seed=None,
        logit_bias=None,
        max_tokens=None,
        logprobs=None,
        top_logprobs=None,
        presence_penalty=None,
        frequency_penalty=None,
        stream=None,
    ),
    "prefill_continue_final_message": chat(
        messages=[USER, {"role": "assistant", "content": "Once upon"}],
        continue_final_message=True,
        add_generation_prompt=False,
    ),
}


@pytest.mark.parametrize("payload", VALID_CHAT.values(), ids=VALID_CHAT.keys())
def test_valid_chat_request_parses_losslessly(payload: dict[str, Any]) -> None:
    request = ChatCompletionRequest.model_validate(payload)
    # Everything given comes back, with its values (nothing coerced, dropped or renamed)...
    assert request.model_dump(by_alias=True, exclude_unset=True) == payload
    # ...and all of it is declared: none of these bodies has a field we would call unknown.
    assert request.unknown_fields() == []
    # The JSON path (what the server uses) gives the same model.
    assert ChatCompletionRequest.model_validate_json(json.dumps(payload)) == request


@requires_spec
@pytest.mark.parametrize("payload", VALID_CHAT.values(), ids=VALID_CHAT.keys())
def test_valid_chat_request_is_valid_for_openai(payload: dict[str, Any]) -> None:
    # Our valid table is not more permissive than OpenAI's own schema (the vLLM extensions pass
    # because the spec does not close the object). One spec quirk: `top_logprobs` is nullable in
    # CreateChatCompletionRequest but also declared non-nullable in the CreateModelResponseProperties
    # it is allOf'd with, so the combined schema refuses the null its own field allows.
    expected = ["top_logprobs: None is not of type 'integer'"] if payload.get("top_logprobs", 0) is None else []
    assert schema_errors(payload, "CreateChatCompletionRequest") == expected


def test_leniency_outside_the_spec_that_changes_no_meaning() -> None:
    # Bodies OpenAI's schema refuses but clients send, read as vLLM and llama.cpp read them.
    assert ChatCompletionRequest.model_validate(chat(stop=[])).stop == []  # no stop sequence
    if spec_available():  # it is outside the spec: the spec's minItems is 1
        assert schema_errors(chat(stop=[]), "CreateChatCompletionRequest") != []
    bias = ChatCompletionRequest.model_validate_json(json.dumps(chat(logit_bias={"0": 5.0, "1": -100.0}))).logit_bias
    assert bias == {"0": 5, "1": -100} and all(type(v) is int for v in bias.values())


def test_chat_request_fields_and_defaults() -> None:
    request = ChatCompletionRequest.model_validate(MAXIMAL_CHAT)
    roles = [message.role for message in request.messages]
    assert roles == ["developer", "system", "user", "assistant", "tool", "assistant", "user"]
    assert request.messages[3].tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert request.messages[4].tool_call_id == "call_1"
    assert request.tools[0].function.parameters["required"] == ["city"]
    assert request.tool_choice.function.name == "get_weather"
    assert request.stream_options.include_usage is True
    # max_completion_tokens wins over the deprecated max_tokens.
    assert request.requested_max_tokens() == 50

    minimal = ChatCompletionRequest.model_validate(chat())
    assert (minimal.n, minimal.stream, minimal.logprobs, minimal.parallel_tool_calls) == (1, False, False, True)
    assert (minimal.temperature, minimal.top_p, minimal.max_tokens) == (None, None, None)
    assert (minimal.skip_special_tokens, minimal.add_generation_prompt, minimal.min_tokens) == (True, True, 0)
    assert minimal.requested_max_tokens() is None
    assert ChatCompletionRequest.model_validate(chat(max_tokens=7)).requested_max_tokens() == 7


def test_json_schema_response_format_keeps_wire_name() -> None:
    request = ChatCompletionRequest.model_validate(VALID_CHAT["response_format_json_schema"])
    json_schema = request.response_format.json_schema
    assert json_schema.name == "city-answer_1"
    assert json_schema.schema_ == {"type": "object", "properties": {"city": {"type": "string"}}}
    assert json_schema.unknown_fields() == []


def test_continue_final_message_implies_no_generation_prompt() -> None:
    payload = chat(messages=[USER, {"role": "assistant", "content": "Once upon"}], continue_final_message=True)
    request = ChatCompletionRequest.model_validate(payload)
    # vLLM would reject this (add_generation_prompt defaults to true); we take the caller's meaning.
    assert request.continue_final_message is True
    assert request.add_generation_prompt is False


# Each case: a body and the top-level parameter every resulting error must point at.
INVALID_CHAT = {
    "missing_messages": ({"model": MODEL}, "messages"),
    "empty_messages": (chat(messages=[]), "messages"),
    "messages_not_a_list": (chat(messages={"role": "user", "content": "Hi"}), "messages"),
    "missing_model": ({"messages": [USER]}, "model"),
    "model_not_a_string": (chat(model=7), "model"),
    "unknown_role": (chat(messages=[{"role": "robot", "content": "Hi"}]), "messages"),
    "missing_role": (chat(messages=[{"content": "Hi"}]), "messages"),
    "user_without_content": (chat(messages=[{"role": "user"}]), "messages"),
    "user_content_number": (chat(messages=[{"role": "user", "content": 5}]), "messages"),
    "user_content_empty_parts": (chat(messages=[{"role": "user", "content": []}]), "messages"),
    "user_content_unknown_part": (
        chat(messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
        "messages",
    ),
    "text_part_without_text": (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages"),
    "system_image_part": (
        chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]),
        "messages",
    ),
    "image_bad_detail": (
        chat(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "max"}}]}]
        ),
        "messages",
    ),
    "assistant_without_content_or_calls": (chat(messages=[USER, {"role": "assistant"}]), "messages"),
    "assistant_null_content_no_calls": (chat(messages=[USER, {"role": "assistant", "content": None}]), "messages"),
    "assistant_bad_tool_call": (
        chat(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
            ]
        ),
        "messages",
    ),
    "tool_without_tool_call_id": (chat(messages=[{"role": "tool", "content": "18C"}]), "messages"),
    "function_without_name": (chat(messages=[{"role": "function", "content": "18C"}]), "messages"),
    "function_without_content": (chat(messages=[{"role": "function", "name": "f"}]), "messages"),
    "name_not_a_string": (chat(messages=[{"role": "user", "content": "Hi", "name": 3}]), "messages"),
    "temperature_negative": (chat(temperature=-0.1), "temperature"),
    "temperature_above_2": (chat(temperature=2.01), "temperature"),
    "temperature_string": (chat(temperature="0.5"), "temperature"),
    "top_p_above_1": (chat(top_p=1.5), "top_p"),
    "top_p_negative": (chat(top_p=-0.1), "top_p"),
    "presence_penalty_low": (chat(presence_penalty=-2.5), "presence_penalty"),
    "frequency_penalty_high": (chat(frequency_penalty=2.5), "frequency_penalty"),
    "n_zero": (chat(n=0), "n"),
    "n_above_128": (chat(n=129), "n"),
    "n_float": (chat(n=1.5), "n"),
    "n_string": (chat(n="2"), "n"),
    "logprobs_integer": (chat(logprobs=1), "logprobs"),
    "logprobs_string": (chat(logprobs="true"), "logprobs"),
    "top_logprobs_above_20": (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    "top_logprobs_negative": (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    "top_logprobs_without_logprobs": (chat(top_logprobs=2), "top_logprobs"),
    "top_logprobs_with_logprobs_false": (chat(logprobs=False, top_logprobs=0), "top_logprobs"),
    "logit_bias_above_100": (chat(logit_bias={"50256": 101}), "logit_bias"),
    "logit_bias_below_minus_100": (chat(logit_bias={"1": -101}), "logit_bias"),
    "logit_bias_float": (chat(logit_bias={"1": 1.5}), "logit_bias"),
    "logit_bias_whole_float_above_100": (chat(logit_bias={"1": 101.0}), "logit_bias"),
    "logit_bias_bool": (chat(logit_bias={"1": True}), "logit_bias"),
    "logit_bias_non_token_key": (chat(logit_bias={"hello": 1}), "logit_bias"),
    "logit_bias_negative_key": (chat(logit_bias={"-5": 1}), "logit_bias"),
    "stop_five": (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    "stop_number": (chat(stop=7), "stop"),
    "stop_list_of_numbers": (chat(stop=[1]), "stop"),
    "seed_beyond_int64": (chat(seed=2**63), "seed"),
    "max_tokens_zero": (chat(max_tokens=0), "max_tokens"),
    "max_tokens_negative": (chat(max_tokens=-1), "max_tokens"),
    "max_tokens_string": (chat(max_tokens="10"), "max_tokens"),
    "max_completion_tokens_zero": (chat(max_completion_tokens=0), "max_completion_tokens"),
    "stream_string": (chat(stream="yes"), "stream"),
    "stream_options_without_stream": (chat(stream_options={"include_usage": True}), "stream_options"),
    "stream_options_with_stream_false": (chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
    "include_usage_string": (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    "user_number": (chat(user=12), "user"),
    "tool_without_function": (chat(tools=[{"type": "function"}]), "tools"),
    "tool_custom_type": (chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools"),
    "tool_function_without_name": (chat(tools=[{"type": "function", "function": {"description": "d"}}]), "tools"),
    "tool_name_with_space": (chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools"),
    "tool_name_too_long": (chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]), "tools"),
    "tool_parameters_not_object": (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
        "tools",
    ),
    "tools_not_a_list": (chat(tools=WEATHER_TOOL), "tools"),
    "tool_choice_unknown_string": (chat(tools=[WEATHER_TOOL], tool_choice="any"), "tool_choice"),
    "tool_choice_without_tools": (chat(tool_choice="required"), "tool_choice"),
    "tool_choice_named_not_in_tools": (
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        "tool_choice",
    ),
    "tool_choice_named_without_name": (
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {}}),
        "tool_choice",
    ),
    "parallel_tool_calls_string": (chat(parallel_tool_calls="yes"), "parallel_tool_calls"),
    "functions_empty": (chat(functions=[]), "functions"),
    "function_call_without_functions": (chat(function_call="auto"), "function_call"),
    "function_call_unknown_name": (chat(functions=[{"name": "f"}], function_call={"name": "g"}), "function_call"),
    "response_format_unknown_type": (chat(response_format={"type": "xml"}), "response_format"),
    "response_format_json_schema_without_name": (
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format",
    ),
    "response_format_string": (chat(response_format="json"), "response_format"),
    "top_k_below_minus_1": (chat(top_k=-2), "top_k"),
    "min_p_above_1": (chat(min_p=1.5), "min_p"),
    "repetition_penalty_zero": (chat(repetition_penalty=0), "repetition_penalty"),
    "min_tokens_negative": (chat(min_tokens=-1), "min_tokens"),
    "min_tokens_above_max_tokens": (chat(min_tokens=10, max_tokens=5), "min_tokens"),
    "stop_token_ids_negative": (chat(stop_token_ids=[-1]), "stop_token_ids"),
    "chat_template_kwargs_list": (chat(chat_template_kwargs=["x"]), "chat_template_kwargs"),
    "continue_final_message_after_user": (
        chat(continue_final_message=True, add_generation_prompt=False),
        "continue_final_message",
    ),
    "continue_final_message_with_generation_prompt": (
        chat(
            messages=[USER, {"role": "assistant", "content": "x"}],
            continue_final_message=True,
            add_generation_prompt=True,
        ),
        "continue_final_message",
    ),
}


@pytest.mark.parametrize(("payload", "param"), INVALID_CHAT.values(), ids=INVALID_CHAT.keys())
def test_invalid_chat_request_raises(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(payload)
    assert error_params(caught.value) == {param}


def test_cross_field_errors_name_their_parameter() -> None:
    # The server maps these to OpenAI's {"param": ...}; the loc is empty, the ctx carries it.
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(chat(stream_options={"include_usage": True}))
    (error,) = caught.value.errors()
    assert error["type"] == "invalid_request"
    assert error["ctx"] == {"param": "stream_options"}
    assert error["msg"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."


def test_bad_array_item_is_reported_once_in_its_own_branch() -> None:
    # string-or-array fields are tagged by shape: one error, in the array branch, at the bad item.
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(chat(messages=[{"role": "user", "content": [{"type": "video"}]}]))
    (error,) = caught.value.errors()
    assert error["type"] == "union_tag_invalid"
    assert error["loc"] == ("messages", 0, "user", "content", "array", 0)


def test_non_finite_numbers_are_rejected_from_json() -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "temperature": {literal}}}'
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate_json(body)
        assert error_params(caught.value) == {"temperature"}


def test_malformed_json_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(b'{"model": "m", "messages": [')
    assert caught.value.errors()[0]["type"] == "json_invalid"


# =============================================================================================
# Unknown fields
# =============================================================================================


def test_unknown_fields_are_kept_and_listed_with_paths() -> None:
    payload = chat(
        messages=[
            {"role": "system", "content": "S", "cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": [{"type": "text", "text": "Hi", "prompt_cache_breakpoint": True}]},
        ],
        tools=[{"type": "function", "function": {"name": "f", "x_hint": 1}, "origin": "mcp"}],
        service_tier="flex",
        store=True,
        metadata={"k": "v"},
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    request = ChatCompletionRequest.model_validate(payload)
    assert sorted(request.unknown_fields()) == sorted(
        [
            "service_tier",
            "store",
            "metadata",
            "messages[0].cache_control",
            "messages[1].content[0].prompt_cache_breakpoint",
            "stream_options.include_obfuscation",
            "tools[0].origin",
            "tools[0].function.x_hint",
        ]
    )
    # Kept, not dropped: a strict-mode server can still see the values.
    assert request.model_extra == {"service_tier": "flex", "store": True, "metadata": {"k": "v"}}


def test_free_form_objects_are_not_reported_as_unknown() -> None:
    # JSON schemas, tool parameters, template kwargs and logit_bias keys belong to the caller.
    request = ChatCompletionRequest.model_validate(
        chat(
            tools=[WEATHER_TOOL],
            chat_template_kwargs={"enable_thinking": True, "anything": [1, 2]},
            logit_bias={"5": 1},
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"weird": 1}}},
        )
    )
    assert request.unknown_fields() == []


def test_unknown_fields_on_completion_and_tokenize_requests() -> None:
    assert CompletionRequest.model_validate(completion(best_of=2, n=1, logprobs=1, foo="bar")).unknown_fields() == [
        "foo"
    ]
    assert DetokenizeRequest.model_validate({"tokens": [1], "x": 1}).unknown_fields() == ["x"]


# =============================================================================================
# Completion requests
# =============================================================================================

VALID_COMPLETION = {
    "minimal": completion(),
    "empty_string": completion(prompt=""),
    "list_of_strings": completion(prompt=["a", "b"]),
    "token_ids": completion(prompt=[1, 2, 3]),
    "list_of_token_ids": completion(prompt=[[1, 2], [3]]),
    "maximal": completion(
        best_of=3,
        n=2,
        echo=True,
        logprobs=5,
        suffix=" The end.",
        max_tokens=64,
        temperature=1.5,
        top_p=0.95,
        stop="\n",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"50256": -100},
        seed=7,
        user="u",
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.0,
        min_tokens=1,
        ignore_eos=True,
        stop_token_ids=[0],
        skip_special_tokens=True,
        include_stop_str_in_output=False,
    ),
    "score_prompt": completion(echo=True, max_tokens=0, logprobs=0),
    "streamed_with_usage": completion(stream=True, stream_options={"include_usage": True}, n=2, best_of=2),
    "nulls": completion(best_of=None, echo=None, logprobs=None, max_tokens=None, suffix=None, n=None),
}


@pytest.mark.parametrize("payload", VALID_COMPLETION.values(), ids=VALID_COMPLETION.keys())
def test_valid_completion_request_parses_losslessly(payload: dict[str, Any]) -> None:
    request = CompletionRequest.model_validate(payload)
    assert request.model_dump(exclude_unset=True) == payload
    assert request.unknown_fields() == []


@requires_spec
@pytest.mark.parametrize("payload", VALID_COMPLETION.values(), ids=VALID_COMPLETION.keys())
def test_valid_completion_request_is_valid_for_openai(payload: dict[str, Any]) -> None:
    assert_matches(payload, "CreateCompletionRequest")


def test_completion_request_defaults() -> None:
    request = CompletionRequest.model_validate(completion())
    # The spec's default max_tokens for completions is 16 (chat has none).
    assert (request.max_tokens, request.echo, request.logprobs, request.best_of, request.n) == (
        16,
        False,
        None,
        None,
        1,
    )
    assert request.requested_max_tokens() == 16


INVALID_COMPLETION = {
    "missing_prompt": ({"model": MODEL}, "prompt"),
    "null_prompt": (completion(prompt=None), "prompt"),
    "prompt_number": (completion(prompt=5), "prompt"),
    "empty_prompt_list": (completion(prompt=[]), "prompt"),
    "empty_token_list_in_batch": (completion(prompt=[[]]), "prompt"),
    "mixed_tokens_and_text": (completion(prompt=[1, "a"]), "prompt"),
    "negative_token_id": (completion(prompt=[-1]), "prompt"),
    "float_token_id": (completion(prompt=[1.0]), "prompt"),
    "missing_model": ({"prompt": "x"}, "model"),
    "logprobs_above_5": (completion(logprobs=6), "logprobs"),
    "logprobs_bool": (completion(logprobs=True), "logprobs"),
    "best_of_above_20": (completion(best_of=21), "best_of"),
    "best_of_below_n": (completion(best_of=1, n=2), "best_of"),
    "best_of_streamed": (completion(best_of=3, stream=True), "best_of"),
    "max_tokens_negative": (completion(max_tokens=-1), "max_tokens"),
    "echo_string": (completion(echo="yes"), "echo"),
    "suffix_number": (completion(suffix=3), "suffix"),
    "n_zero": (completion(n=0), "n"),
    "temperature_above_2": (completion(temperature=3), "temperature"),
    "stream_options_without_stream": (completion(stream_options={"include_usage": True}), "stream_options"),
    "min_tokens_above_max_tokens": (completion(min_tokens=20), "min_tokens"),
    "logit_bias_out_of_range": (completion(logit_bias={"1": 200}), "logit_bias"),
}


@pytest.mark.parametrize(("payload", "param"), INVALID_COMPLETION.values(), ids=INVALID_COMPLETION.keys())
def test_invalid_completion_request_raises(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(payload)
    assert error_params(caught.value) == {param}


# =============================================================================================
# Tokenize / detokenize requests and responses (vLLM shapes, not in OpenAI's spec)
# =============================================================================================


def test_tokenize_request_form_is_chosen_by_key() -> None:
    text = tokenize_request_adapter.validate_python({"model": MODEL, "prompt": "Hello"})
    assert isinstance(text, TokenizeCompletionRequest)
    assert (text.prompt, text.add_special_tokens) == ("Hello", True)

    chat_form = tokenize_request_adapter.validate_json(json.dumps({"messages": [USER]}))
    assert isinstance(chat_form, TokenizeChatRequest)
    assert chat_form.model is None
    assert (chat_form.add_generation_prompt, chat_form.add_special_tokens) == (True, False)
    assert chat_form.messages[0].content == "Hi"

    with pytest.raises(ValidationError):
        tokenize_request_adapter.validate_python({"model": MODEL})
    with pytest.raises(ValidationError):
        tokenize_request_adapter.validate_python({"messages": [{"role": "robot", "content": "x"}]})


def test_detokenize_request_rejects_bad_tokens() -> None:
    assert DetokenizeRequest.model_validate({"model": MODEL, "tokens": [1, 2]}).tokens == [1, 2]
    for tokens in ([-1], ["a"], "1 2", None):
        with pytest.raises(ValidationError):
            DetokenizeRequest.model_validate({"tokens": tokens})


def test_tokenize_and_detokenize_responses_have_vllm_shape() -> None:
    response = TokenizeResponse(count=2, max_model_len=8192, tokens=[9906, 1917])
    assert dumped(response) == {"count": 2, "max_model_len": 8192, "tokens": [9906, 1917]}
    with_strs = TokenizeResponse(count=1, max_model_len=8192, tokens=[9906], token_strs=["Hello"])
    assert dumped(with_strs)["token_strs"] == ["Hello"]
    assert dumped(DetokenizeResponse(prompt="Hello world")) == {"prompt": "Hello world"}


# =============================================================================================
# Chat responses
# =============================================================================================


def usage(cached: int | None = None, reasoning: int | None = None) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=12,
        completion_tokens=5,
        total_tokens=17,
        prompt_tokens_details=None if cached is None else PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=None if reasoning is None else CompletionTokensDetails(reasoning_tokens=reasoning),
    )


def token_logprob(token: str, logprob: float, *alternatives: tuple[str, float]) -> ChatCompletionTokenLogprob:
    return ChatCompletionTokenLogprob(
        token=token,
        logprob=logprob,
        bytes=list(token.encode()),
        top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in alternatives],
    )


def chat_response(*choices: ChatCompletionResponseChoice, **fields: Any) -> ChatCompletionResponse:
    return ChatCompletionResponse(id="chatcmpl-1", created=1_700_000_000, model=MODEL, choices=list(choices), **fields)


def test_chat_response_text_shape() -> None:
    response = chat_response(
        ChatCompletionResponseChoice(index=0, message=ChatCompletionMessage(content="Hello!"), finish_reason="stop"),
        usage=usage(cached=8),
    )
    assert dumped(response) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                # content and refusal are required-nullable; tool_calls is omitted when there are none.
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
    }
    # Python-mode dumps follow the same rules as the JSON text.
    assert response.model_dump() == dumped(response)


def test_chat_response_tool_calls_keep_null_content() -> None:
    call = ChatCompletionMessageToolCall(
        id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}')
    )
    message = ChatCompletionMessage(content=None, tool_calls=[call])
    response = chat_response(ChatCompletionResponseChoice(index=0, message=message, finish_reason="tool_calls"))
    body = dumped(response)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    }
    assert "usage" not in body and "system_fingerprint" not in body


def test_logprobs_clamp_minus_infinity() -> None:
    entry = token_logprob("Hi", float("-inf"), ("Hi", float("-inf")))
    assert entry.logprob == MIN_LOGPROB
    assert dumped(entry)["top_logprobs"][0]["logprob"] == MIN_LOGPROB


CHAT_RESPONSES = {
    "text_with_usage": chat_response(
        ChatCompletionResponseChoice(index=0, message=ChatCompletionMessage(content="Hello!"), finish_reason="stop"),
        usage=usage(cached=8, reasoning=0),
        system_fingerprint="heron-0.1.0",
    ),
    "n2_with_logprobs": chat_response(
        *(
            ChatCompletionResponseChoice(
                index=i,
                message=ChatCompletionMessage(content="Hi there"),
                logprobs=ChatCompletionLogprobs(
                    content=[
                        token_logprob("Hi", -0.1, ("Hi", -0.1), ("Hello", -2.5)),
                        token_logprob(" there", float("-inf")),
                    ]
                ),
                finish_reason="length",
                stop_reason=None,
            )
            for i in range(2)
        ),
        usage=usage(),
    ),
    "tool_calls": chat_response(
        ChatCompletionResponseChoice(
            index=0,
            message=ChatCompletionMessage(
                tool_calls=[
                    ChatCompletionMessageToolCall(id="call_1", function=FunctionCall(name="a", arguments="{}")),
                    ChatCompletionMessageToolCall(id="call_2", function=FunctionCall(name="b", arguments='{"x":1}')),
                ]
            ),
            finish_reason="tool_calls",
        )
    ),
    "legacy_function_call": chat_response(
        ChatCompletionResponseChoice(
            index=0,
            message=ChatCompletionMessage(function_call=FunctionCall(name="f", arguments="{}")),
            finish_reason="function_call",
        )
    ),
    "refusal_and_reasoning_and_stop_reason": chat_response(
        ChatCompletionResponseChoice(
            index=0,
            message=ChatCompletionMessage(
                content=None, refusal="I can't help with that.", reasoning_content="Policy..."
            ),
            finish_reason="stop",
            stop_reason="</s>",
        )
    ),
    "no_choices": chat_response(),
}


@requires_spec
@pytest.mark.parametrize("response", CHAT_RESPONSES.values(), ids=CHAT_RESPONSES.keys())
def test_chat_response_matches_openai_schema(response: ChatCompletionResponse) -> None:
    assert_matches(dumped(response), "CreateChatCompletionResponse")


def test_chat_response_rejects_bad_values() -> None:
    message = ChatCompletionMessage(content="x")
    with pytest.raises(ValidationError):
        ChatCompletionResponseChoice(index=0, message=message, finish_reason="abort")
    with pytest.raises(ValidationError):
        # Typos in our own builders fail loudly instead of reaching the client.
        ChatCompletionResponseChoice(index=0, message=message, finish_reason="stop", finsh_reason="stop")


# =============================================================================================
# Chat stream chunks
# =============================================================================================


def chat_chunk(*choices: ChatCompletionResponseStreamChoice, **fields: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", created=1_700_000_000, model=MODEL, choices=list(choices), **fields)


def test_chat_stream_shapes_follow_openai() -> None:
    first = chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(role="assistant", content="", refusal=None))
    )
    middle = chat_chunk(ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(content="Hel")))
    last = chat_chunk(ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(), finish_reason="stop"))
    assert dumped(first)["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    # Later deltas carry only what is new; finish_reason stays present as null until the end.
    assert dumped(middle)["choices"] == [
        {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    ]
    assert dumped(last)["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    # Without include_usage there is no usage key at all.
    assert all("usage" not in dumped(chunk) for chunk in (first, middle, last))


def test_chat_stream_usage_null_only_when_set() -> None:
    with_null = chat_chunk(ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(content="x")), usage=None)
    assert dumped(with_null)["usage"] is None
    final = chat_chunk(usage=usage())
    assert dumped(final)["choices"] == []
    assert dumped(final)["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def test_tool_call_delta_carries_explicit_null_content() -> None:
    delta = ChoiceDelta(
        role="assistant",
        content=None,
        tool_calls=[
            ChoiceDeltaToolCall(
                index=0, id="call_1", type="function", function=ChoiceDeltaToolCallFunction(name="f", arguments="")
            )
        ],
    )
    assert dumped(delta) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}],
    }
    follow_up = ChoiceDeltaToolCall(index=0, function=ChoiceDeltaToolCallFunction(arguments='{"a":'))
    assert dumped(follow_up) == {"index": 0, "function": {"arguments": '{"a":'}}


CHAT_CHUNKS = {
    "role": chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(role="assistant", content="", refusal=None))
    ),
    "content": chat_chunk(ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(content="Hel"))),
    "content_usage_null": chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(content="lo")), usage=None
    ),
    "logprobs": chat_chunk(
        ChatCompletionResponseStreamChoice(
            index=1,
            delta=ChoiceDelta(content="Hi"),
            logprobs=ChatCompletionLogprobs(content=[token_logprob("Hi", -0.3, ("Hi", -0.3), ("Yo", -1.9))]),
        )
    ),
    "tool_call_start": chat_chunk(
        ChatCompletionResponseStreamChoice(
            index=0,
            delta=ChoiceDelta(
                role="assistant",
                content=None,
                tool_calls=[
                    ChoiceDeltaToolCall(
                        index=0,
                        id="call_1",
                        type="function",
                        function=ChoiceDeltaToolCallFunction(name="f", arguments=""),
                    )
                ],
            ),
        )
    ),
    "tool_call_arguments": chat_chunk(
        ChatCompletionResponseStreamChoice(
            index=0,
            delta=ChoiceDelta(
                tool_calls=[ChoiceDeltaToolCall(index=0, function=ChoiceDeltaToolCallFunction(arguments='{"a": 1}'))]
            ),
        )
    ),
    "legacy_function_call": chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(function_call={"name": "f", "arguments": "{}"}))
    ),
    "reasoning": chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(reasoning_content="Thinking"))
    ),
    "finish": chat_chunk(
        ChatCompletionResponseStreamChoice(index=0, delta=ChoiceDelta(), finish_reason="length", stop_reason=None),
        system_fingerprint="heron-0.1.0",
    ),
    "usage": chat_chunk(usage=usage(cached=0, reasoning=3)),
}


@requires_spec
@pytest.mark.parametrize("chunk", CHAT_CHUNKS.values(), ids=CHAT_CHUNKS.keys())
def test_chat_chunk_matches_openai_schema(chunk: ChatCompletionChunk) -> None:
    assert_matches(dumped(chunk), "CreateChatCompletionStreamResponse")


# =============================================================================================
# Completion responses and chunks
# =============================================================================================


def completion_response(*choices: CompletionResponseChoice, **fields: Any) -> CompletionResponse:
    return CompletionResponse(id="cmpl-1", created=1_700_000_000, model=MODEL, choices=list(choices), **fields)


def completion_chunk(*choices: CompletionResponseStreamChoice, **fields: Any) -> CompletionChunk:
    return CompletionChunk(id="cmpl-1", created=1_700_000_000, model=MODEL, choices=list(choices), **fields)


SAMPLE_LOGPROBS = CompletionLogprobs(
    tokens=[" a", " time"],
    token_logprobs=[-0.5, float("-inf")],
    top_logprobs=[{" a": -0.5, " the": -1.2}, {" time": MIN_LOGPROB}],
    text_offset=[16, 18],
)


def test_completion_response_shape() -> None:
    response = completion_response(
        CompletionResponseChoice(text=" a time", index=0, logprobs=SAMPLE_LOGPROBS, finish_reason="length"),
        usage=usage(),
    )
    body = dumped(response)
    assert body["object"] == "text_completion"
    assert body["choices"][0] == {
        "text": " a time",
        "index": 0,
        "logprobs": {
            "text_offset": [16, 18],
            "token_logprobs": [-0.5, MIN_LOGPROB],
            "tokens": [" a", " time"],
            "top_logprobs": [{" a": -0.5, " the": -1.2}, {" time": MIN_LOGPROB}],
        },
        "finish_reason": "length",
    }
    no_logprobs = completion_response(CompletionResponseChoice(text="x", index=0, finish_reason="stop"))
    assert dumped(no_logprobs)["choices"][0]["logprobs"] is None


COMPLETION_RESPONSES = {
    "with_logprobs_and_usage": completion_response(
        CompletionResponseChoice(text=" a time", index=0, logprobs=SAMPLE_LOGPROBS, finish_reason="length"),
        usage=usage(cached=4),
        system_fingerprint="heron-0.1.0",
    ),
    "n2_plain": completion_response(
        CompletionResponseChoice(text="A", index=0, finish_reason="stop", stop_reason="\n"),
        CompletionResponseChoice(text="B", index=1, finish_reason="stop", stop_reason=2),
    ),
}


@requires_spec
@pytest.mark.parametrize("response", COMPLETION_RESPONSES.values(), ids=COMPLETION_RESPONSES.keys())
def test_completion_response_matches_openai_schema(response: CompletionResponse) -> None:
    assert_matches(dumped(response), "CreateCompletionResponse")


@requires_spec
def test_echo_logprobs_null_is_the_only_spec_deviation() -> None:
    # With echo, the first prompt token has no logprob: OpenAI sends null, the spec says number.
    echoed = completion_response(
        CompletionResponseChoice(
            text="Once upon",
            index=0,
            logprobs=CompletionLogprobs(
                tokens=["Once", " upon"],
                token_logprobs=[None, -3.0],
                top_logprobs=[None, {" upon": -3.0}],
                text_offset=[0, 4],
            ),
            finish_reason="length",
        )
    )
    body = dumped(echoed)
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -3.0]
    errors = schema_errors(body, "CreateCompletionResponse")
    assert sorted({e.split(":")[0] for e in errors}) == [
        "choices/0/logprobs/token_logprobs/0",
        "choices/0/logprobs/top_logprobs/0",
    ]


def _completion_stream_schema() -> dict[str, Any]:
    """CreateCompletionResponse as OpenAI actually streams it: finish_reason and usage may be null.

    The spec reuses the non-streaming schema for stream events, where neither is nullable, while its
    own stream_options text promises `usage: null` and every stream sends `finish_reason: null`.
    """
    schema = component("CreateCompletionResponse")
    choice = schema["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"]["type"] = ["string", "null"]
    choice["finish_reason"]["enum"] = [*choice["finish_reason"]["enum"], None]
    schema["properties"]["usage"] = {"anyOf": [schema["properties"]["usage"], {"type": "null"}]}
    return schema


COMPLETION_CHUNKS = {
    "text": completion_chunk(CompletionResponseStreamChoice(text=" a", index=0)),
    "text_usage_null": completion_chunk(CompletionResponseStreamChoice(text=" a", index=1), usage=None),
    "logprobs": completion_chunk(
        CompletionResponseStreamChoice(
            text=" a",
            index=0,
            logprobs=CompletionLogprobs(
                tokens=[" a"], token_logprobs=[-0.5], top_logprobs=[{" a": -0.5}], text_offset=[16]
            ),
        )
    ),
    "finish": completion_chunk(
        CompletionResponseStreamChoice(text="", index=0, finish_reason="stop", stop_reason="\n")
    ),
    "usage": completion_chunk(usage=usage()),
}


@requires_spec
@pytest.mark.parametrize("chunk", COMPLETION_CHUNKS.values(), ids=COMPLETION_CHUNKS.keys())
def test_completion_chunk_matches_openai_schema(chunk: CompletionChunk) -> None:
    body = dumped(chunk)
    # Always valid against the stream reading of the schema...
    assert schema_errors(body, schema=_completion_stream_schema()) == []
    # ...and against the literal spec exactly where no null finish_reason / usage is involved.
    unpatched = {e.split(":")[0] for e in schema_errors(body, "CreateCompletionResponse")}
    expected = [f"choices/{i}/finish_reason" for i, c in enumerate(body["choices"]) if c["finish_reason"] is None]
    expected += ["usage"] if "usage" in body and body["usage"] is None else []
    assert sorted(unpatched) == sorted(expected)


def test_completion_chunk_shapes() -> None:
    body = dumped(COMPLETION_CHUNKS["text"])
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"text": " a", "index": 0, "logprobs": None, "finish_reason": None}],
    }
    assert dumped(COMPLETION_CHUNKS["text_usage_null"])["usage"] is None


# =============================================================================================
# Errors and models
# =============================================================================================


ERRORS = {
    "bad_param": ErrorResponse(
        error=ErrorDetail(
            message="Invalid value for 'temperature': must be at most 2.",
            type="invalid_request_error",
            param="temperature",
        )
    ),
    "with_code": ErrorResponse(
        error=ErrorDetail(message="The model 'x' does not exist", type="invalid_request_error", code="model_not_found")
    ),
}


def test_error_response_keeps_null_param_and_code() -> None:
    assert dumped(ERRORS["with_code"]) == {
        "error": {
            "message": "The model 'x' does not exist",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    assert dumped(ERRORS["bad_param"])["error"]["code"] is None


@requires_spec
@pytest.mark.parametrize("error", ERRORS.values(), ids=ERRORS.keys())
def test_error_matches_openai_schema(error: ErrorResponse) -> None:
    assert_matches(dumped(error), "ErrorResponse")
    assert_matches(dumped(error.error), "Error")


MODELS = ModelList(
    data=[
        ModelCard(id=MODEL, created=1_700_000_000, root="/models/smollm2.gguf", max_model_len=8192),
        ModelCard(id="minilm", created=1_700_000_000),
    ]
)


def test_model_list_shape() -> None:
    body = dumped(MODELS)
    assert body["object"] == "list"
    assert body["data"][0] == {
        "id": MODEL,
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "heron",
        "root": "/models/smollm2.gguf",
        "max_model_len": 8192,
    }
    assert body["data"][1] == {"id": "minilm", "object": "model", "created": 1_700_000_000, "owned_by": "heron"}


@requires_spec
def test_models_match_openai_schema() -> None:
    assert_matches(dumped(MODELS), "ListModelsResponse")
    for card in MODELS.data:
        assert_matches(dumped(card), "Model")


@requires_spec
def test_schema_helper_catches_missing_required_nulls() -> None:
    # Guard the guard: dropping a required-nullable key, or a wrong object tag, must fail validation.
    body = dumped(CHAT_CHUNKS["content"])
    del body["choices"][0]["finish_reason"]
    assert schema_errors(body, "CreateChatCompletionStreamResponse") == [
        "choices/0: 'finish_reason' is a required property"
    ]
    wrong_tag = dumped(CHAT_RESPONSES["text_with_usage"]) | {"object": "chat.completion.chunk"}
    assert schema_errors(wrong_tag, "CreateChatCompletionResponse") != []
