"""The Messages request models and their conversion to chat (heron/server/protocol/messages.py):
blocks -> chat messages, tool and tool_choice mapping, and the 400s that name the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from heron.server.errors import APIError, validation_error
from heron.server.protocol.messages import (
    CountTokensRequest,
    MessageObject,
    MessagesRequest,
    MessageUsage,
    anthropic_error_body,
    to_chat_request,
)

TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _request(**fields) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **fields}
    return MessagesRequest.model_validate(body)


def _error(body: dict, model=MessagesRequest) -> APIError:
    with pytest.raises(ValidationError) as caught:
        request = model.model_validate(body)
        to_chat_request(request)
    return validation_error(caught.value, body)


def test_string_content_and_system():
    chat = to_chat_request(_request(system="Be brief."))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert chat.max_tokens == 8 and chat.stream is False


def test_system_blocks_joined():
    chat = to_chat_request(_request(system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]))
    assert chat.messages[0].content == "One.\nTwo."


def test_tool_use_and_tool_result_blocks():
    chat = to_chat_request(
        _request(
            tools=[TOOL],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "x"},
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
        )
    )
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages[1]["role"] == "assistant" and messages[1]["content"] == "Let me look."
    call = messages[1]["tool_calls"][0]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"}
    assert messages[4] == {"role": "user", "content": "Thanks"}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")],
)
def test_tool_choice_mapping(choice, expected):
    chat = to_chat_request(_request(tools=[TOOL], tool_choice=choice))
    assert chat.tool_choice == expected
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == TOOL["input_schema"]


def test_named_tool_choice_and_parallel():
    chat = to_chat_request(
        _request(tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    )
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.parallel_tool_calls is False


def test_sampling_fields():
    chat = to_chat_request(_request(stop_sequences=["3"], temperature=0.5, top_p=0.9, top_k=5, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert chat.stop == ["3"] and chat.temperature == 0.5 and chat.top_p == 0.9 and chat.top_k == 5


def test_count_tokens_request_needs_no_max_tokens():
    request = CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert to_chat_request(request).max_tokens is None


def test_missing_max_tokens():
    error = _error({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert error.status == 400 and error.param == "max_tokens"


def test_image_block_refused():
    error = _error(
        {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}
    )
    assert error.param == "messages[0].content[0].type" and "image" in error.message


def test_document_in_tool_result_refused():
    body = {
        "model": "m", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}],
    }
    assert _error(body).param == "messages[0].content[0].content[0].type"


def test_server_tool_refused():
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    assert _error(body).param == "tools[0].type"


def test_named_tool_must_exist():
    body = {
        "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
        "tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"},
    }
    assert _error(body).param == "tool_choice.name"


def test_tool_use_in_user_turn_refused():
    body = {
        "model": "m", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}],
    }
    assert _error(body).param == "messages[0].content[0]"


def test_bad_role_and_temperature():
    assert _error({"model": "m", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}).param == "messages[0].role"
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}
    assert _error(body).param == "temperature"


def test_message_object_shape():
    message = MessageObject(id="msg_1", model="m", content=[], usage=MessageUsage(input_tokens=3, output_tokens=0))
    data = json.loads(message.model_dump_json())
    assert data == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0},
    }


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"), (429, "rate_limit_error"),
     (500, "api_error"), (503, "overloaded_error")],
)
def test_error_envelope(status, kind):
    assert anthropic_error_body(status, "no") == {"type": "error", "error": {"type": kind, "message": "no"}}
