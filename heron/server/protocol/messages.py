"""/v1/messages on the wire (Anthropic's Messages API): the request, the message object, its stream events.

In: a JSON body validated into `MessagesRequest` (Anthropic's `MessageCreateParams`: text,
`tool_use` and `tool_result` blocks, a system prompt, custom tools, sampling), or into
`CountTokensRequest` for `/v1/messages/count_tokens` (the same minus `max_tokens` and sampling).
Out: `MessageObject` (type "message") with `text` and `tool_use` blocks, `MessageUsage`, and the
stream events (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
`content_block_stop`, `message_delta`, `message_stop`, `error`), each dumping to exactly the JSON
the official `anthropic` SDK reads; `anthropic_error_body()` is Anthropic's error envelope.

`to_chat_request(request)` turns a request into our `ChatCompletionRequest`, so generation is the
chat path's (templates, tool plans, grammars): `tool_use` blocks become the assistant's
`tool_calls` (arguments = the JSON of `input`), `tool_result` blocks become `tool` messages,
tool_choice `any` is `required`, `tool` is a named choice, `disable_parallel_tool_use` is
`parallel_tool_calls: false`. Its errors are pydantic `ValidationError`s of type `invalid_request`
naming the Messages parameter (`messages[1].content[0].tool_use_id`).

Refused with a 400 naming the block: image, document and other non-text content, server tools
(web search, bash, code execution, ...). Accepted and not acted on: `thinking`, `metadata`,
`cache_control`, `citations`, `service_tier` and other fields Anthropic defines for its own service
(undeclared ones land in `unknown_fields()`).
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from heron.server.protocol.chat import ChatCompletionRequest
from heron.server.protocol.common import (
    INT32_MAX,
    FunctionName,
    MaxTokens,
    OpenAIRequestModel,
    OpenAIResponseModel,
    TopP,
)

_ALPHABET = string.ascii_letters + string.digits

# Block types Anthropic defines that carry something other than text; refused by name.
_NON_TEXT_BLOCKS = frozenset(
    {"image", "document", "search_result", "container_upload", "server_tool_use", "web_search_tool_result"}
)
# Assistant blocks sent back as history that have no chat counterpart; dropped.
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"]

# Our APIError status -> Anthropic's error `type`.
_ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def make_id(prefix: str) -> str:
    """An Anthropic-style id: `msg_01…`, `toolu_01…` (22 base62 characters after the `01`)."""
    return f"{prefix}_01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def anthropic_error_type(status: int) -> str:
    if status in _ERROR_TYPE_BY_STATUS:
        return _ERROR_TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope: `{"type": "error", "error": {"type", "message"}}`."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def _error(param: str, message: str, code: str = "invalid_value") -> PydanticCustomError:
    return PydanticCustomError("invalid_request", message.replace("{", "(").replace("}", ")"), {"param": param, "code": code})


def _request_error(param: str, message: str, code: str = "invalid_value") -> ValidationError:
    detail = InitErrorDetails(type=_error(param, message, code), loc=(param,), input=None)
    return ValidationError.from_exception_data("MessagesRequest", [detail])


# =============================================================================================
# Request: content blocks
# =============================================================================================


class TextBlockParam(OpenAIRequestModel):
    type: Literal["text"]
    text: str
    # Anthropic's prompt caching and citations: accepted, not acted on.
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ToolUseBlockParam(OpenAIRequestModel):
    """A tool call the assistant made earlier (sent back as history)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlockParam(OpenAIRequestModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlockParam] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(block.text for block in self.content)


class ThinkingBlockParam(OpenAIRequestModel):
    """Extended-thinking output sent back as history; dropped from the prompt."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


ContentBlockParam = Annotated[
    Union[TextBlockParam, ToolUseBlockParam, ToolResultBlockParam, ThinkingBlockParam],
    Field(discriminator="type"),
]


class MessageParam(OpenAIRequestModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockParam]


class ToolParam(OpenAIRequestModel):
    """A custom (client) tool: Anthropic's `Tool`."""

    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoiceParam(OpenAIRequestModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MetadataParam(OpenAIRequestModel):
    user_id: str | None = None


# =============================================================================================
# Request
# =============================================================================================


def _check_blocks(data: Any) -> Any:
    """400s that name the block, before pydantic's union errors would: non-text content and
    server tools."""
    if not isinstance(data, dict):
        return data
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in _NON_TEXT_BLOCKS:
                raise _error(
                    f"messages[{i}].content[{j}].type",
                    f"Content blocks of type '{kind}' are not supported by this server: it serves a text-only model.",
                    "unsupported_content",
                )
            if kind == "tool_result" and isinstance(block.get("content"), list):
                for k, part in enumerate(block["content"]):
                    if isinstance(part, dict) and part.get("type") != "text":
                        raise _error(
                            f"messages[{i}].content[{j}].content[{k}].type",
                            "Only text is supported in 'tool_result' content by this server.",
                            "unsupported_content",
                        )
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise _error(
                f"tools[{i}].type",
                f"Server tools ('{kind[:64]}') are not supported by this server; declare custom tools with an 'input_schema'.",
                "unsupported_tool",
            )
    return data


class CountTokensRequest(OpenAIRequestModel):
    """Body of POST /v1/messages/count_tokens."""

    model: str
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    # Extended thinking: accepted, not acted on (yet).
    thinking: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return _check_blocks(data)

    @model_validator(mode="after")
    def _check_tools(self) -> CountTokensRequest:
        choice = self.tool_choice
        if choice is not None and choice.type == "tool":
            if not choice.name:
                raise _error("tool_choice.name", "Missing required parameter: 'tool_choice.name'.", "missing_required_parameter")
            if choice.name not in {tool.name for tool in self.tools or ()}:
                raise _error("tool_choice.name", f"Tool '{choice.name[:64]}' named in 'tool_choice' is not one of the 'tools'.")
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise _error("tool_choice", "'tool_choice' of type 'any' or 'tool' needs 'tools'.")
        return self


class MessagesRequest(CountTokensRequest):
    """Body of POST /v1/messages (Anthropic's MessageCreateParams)."""

    max_tokens: MaxTokens
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    metadata: MetadataParam | None = None
    stream: bool | None = None


# =============================================================================================
# Request -> chat
# =============================================================================================


def system_text(system: str | list[TextBlockParam] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system
    return "\n".join(block.text for block in system)


def chat_messages(request: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: system first, then each turn; a user turn's
    `tool_result` blocks become `tool` messages, in the order given."""
    messages: list[dict[str, Any]] = []
    system = system_text(request.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        blocks = [TextBlockParam(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        if message.role == "assistant":
            text = "".join(block.text for block in blocks if isinstance(block, TextBlockParam))
            calls = [
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": json.dumps(block.input)}}
                for block in blocks
                if isinstance(block, ToolUseBlockParam)
            ]
            for j, block in enumerate(blocks):
                if isinstance(block, ToolResultBlockParam):
                    raise _request_error(f"messages[{i}].content[{j}]", "'tool_result' blocks belong in 'user' turns.")
            turn: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                turn["tool_calls"] = calls
            if text or calls:
                messages.append(turn)
            continue
        texts: list[str] = []
        for j, block in enumerate(blocks):
            if isinstance(block, ToolUseBlockParam):
                raise _request_error(f"messages[{i}].content[{j}]", "'tool_use' blocks belong in 'assistant' turns.")
            if isinstance(block, TextBlockParam):
                texts.append(block.text)
            elif isinstance(block, ToolResultBlockParam):
                if texts:
                    messages.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                result = block.text()
                messages.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": f"Error: {result}" if block.is_error else result}
                )
        if texts:
            messages.append({"role": "user", "content": "\n".join(texts)})
    if not any(m["role"] != "system" for m in messages):
        raise _request_error("messages", "'messages' must contain at least one non-empty turn.")
    return messages


def _chat_tool_choice(choice: ToolChoiceParam) -> Any:
    if choice.type == "any":
        return "required"
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.type  # auto, none


# Chat field -> the Messages parameter it came from (for errors the chat model finds).
_CHAT_TO_MESSAGES_PARAM = {"stop": "stop_sequences", "max_tokens": "max_tokens", "parallel_tool_calls": "tool_choice"}


def to_chat_request(request: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that generates (or, for count_tokens, would generate) this message.
    `stream` is always false: the route drives streaming itself.

    Raises `ValidationError` (type `invalid_request`, `ctx["param"]` a Messages parameter)."""
    body: dict[str, Any] = {"model": request.model, "messages": chat_messages(request), "stream": False}
    if isinstance(request, MessagesRequest):
        body["max_tokens"] = request.max_tokens
        if request.stop_sequences:
            body["stop"] = request.stop_sequences
        for name in ("temperature", "top_p"):
            if getattr(request, name) is not None:
                body[name] = getattr(request, name)
        if request.top_k:  # Anthropic's 0 is "not set"
            body["top_k"] = request.top_k
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description is not None else {}),
                    "parameters": tool.input_schema,
                },
            }
            for tool in request.tools
        ]
    if request.tool_choice is not None:
        if request.tools or request.tool_choice.type == "none":
            body["tool_choice"] = _chat_tool_choice(request.tool_choice)
        if request.tool_choice.disable_parallel_tool_use and request.tools:
            body["parallel_tool_calls"] = False
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = (error.get("ctx") or {}).get("param") if error["type"] == "invalid_request" else None
        field = str(where or (error["loc"][0] if error["loc"] else "messages")).split(".")[0].split("[")[0]
        param = _CHAT_TO_MESSAGES_PARAM.get(field, field)
        message = str(error["msg"]) if where else f"Invalid '{param}': {error['msg']}."
        raise _request_error(param, message) from None


# =============================================================================================
# Response
# =============================================================================================


class MessageUsage(OpenAIResponseModel):
    """Anthropic's usage: `input_tokens` are the prompt tokens the prefix cache did not hold;
    `cache_read_input_tokens` those it did (their sum is the whole prompt)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class TextBlock(OpenAIResponseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(OpenAIResponseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(OpenAIResponseModel):
    """What a reasoning parser took out of the text (`<think>` blocks). Heron signs nothing: the
    signature is empty, and thinking sent back as history is not checked."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


ContentBlock = Union[ThinkingBlock, TextBlock, ToolUseBlock]


class MessageObject(OpenAIResponseModel):
    _always_emit: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class MessageTokensCount(OpenAIResponseModel):
    input_tokens: int


# --------------------------------------------------------------------------------- stream events


class MessageStartEvent(OpenAIResponseModel):
    type: Literal["message_start"] = "message_start"
    message: MessageObject


class ContentBlockStartEvent(OpenAIResponseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDeltaPayload(OpenAIResponseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDeltaPayload(OpenAIResponseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDeltaPayload(OpenAIResponseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class InputJSONDeltaPayload(OpenAIResponseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(OpenAIResponseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Union[TextDeltaPayload, ThinkingDeltaPayload, SignatureDeltaPayload, InputJSONDeltaPayload]


class ContentBlockStopEvent(OpenAIResponseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaPayload(OpenAIResponseModel):
    _always_emit: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})

    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaUsage(OpenAIResponseModel):
    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDeltaEvent(OpenAIResponseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaPayload
    usage: MessageDeltaUsage


class MessageStopEvent(OpenAIResponseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(OpenAIResponseModel):
    type: Literal["ping"] = "ping"
