"""/v1/responses on the wire: the request, its input items and tools, the response object and its events.

In: a JSON body validated into `ResponseCreateRequest` (OpenAI's CreateResponse: the fields that make
sense for a local model with function tools, plus vLLM's sampling extras). Out: `ResponseObject`
(object "response"), its output items (`ResponseOutputMessage`, `ResponseFunctionToolCall`,
`ResponseReasoningItem`) and the stream events (`Response*Event`, each with `type` and
`sequence_number`), each dumping to exactly OpenAI's JSON.

Also here, as plain functions on these models:

- `input_items(request)`: the request's input as stored items in OpenAI's resource form (ids given,
  `status` filled), what `GET /v1/responses/{id}/input_items` lists and what the store keeps.
- `to_chat_request(request, history)`: the request plus the stored conversation of its
  `previous_response_id` chain, as our `ChatCompletionRequest`, so generation reuses the whole chat
  path (templates, tool plans, grammars). Its errors are pydantic `ValidationError`s of type
  `invalid_request` naming the Responses parameter (`input[2].call_id`), like the model's own.

Not served, and refused with a 400 naming the field: built-in tools (web search, file search,
computer use, code interpreter, image generation, MCP, shells, custom tools), image/file/audio input,
`background`, `conversation`, `prompt`. Accepted and not acted on: `reasoning` (echoed back),
`include` values other than `message.output_text.logprobs`, `text.verbosity`, `stream_options`.
OpenAI fields with no meaning here (`service_tier`, `safety_identifier`, `prompt_cache_key`,
`max_tool_calls`, `context_management`, `moderation`, ...) are not declared: they land in
`unknown_fields()`, as in chat.py.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from heron.server.protocol.chat import ChatCompletionRequest
from heron.server.protocol.common import (
    INT32_MAX,
    MAX_TOKEN_ID_LIST,
    FunctionName,
    Logprob,
    MaxTokens,
    OpenAIRequestModel,
    OpenAIResponseModel,
    Penalty,
    Seed,
    StopSequences,
    Temperature,
    TokenId,
    TopP,
    invalid_request,
    now_unix,
    string_or_array,
)

# Tool `type`s of OpenAI's Responses API other than "function" (openai-openapi.yaml, `Tool`). They
# get "not supported by this server" rather than "invalid value": the caller's body is right for
# OpenAI, only this server does not run those tools.
BUILTIN_TOOL_TYPES = frozenset(
    {
        "file_search",
        "computer",
        "computer_use",
        "computer_use_preview",
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "mcp",
        "code_interpreter",
        "programmatic_tool_calling",
        "image_generation",
        "local_shell",
        "shell",
        "custom",
        "namespace",
        "tool_search",
        "apply_patch",
    }
)
# The one `include` value that changes what we send back.
INCLUDE_LOGPROBS = "message.output_text.logprobs"

ItemStatus = Literal["in_progress", "completed", "incomplete"]


def make_id(prefix: str) -> str:
    """An OpenAI-style object id: `resp_…`, `msg_…`, `fc_…`, `call_…`, `rs_…` (48 hex digits)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def _shown(value: Any) -> str:
    """A caller's value, shortened and brace-free, fit to quote in an error message template."""
    text = str(value)
    text = text if len(text) <= 64 else text[:61] + "..."
    return text.replace("{", "(").replace("}", ")")


def _unsupported(param: str, message: str, code: str) -> PydanticCustomError:
    # `code` rides in ctx beside `param` for an error mapper that fills OpenAI's `code` from it.
    return PydanticCustomError("invalid_request", message, {"param": param, "code": code})


# =============================================================================================
# Request: content parts
# =============================================================================================


class ResponseInputTextParam(OpenAIRequestModel):
    type: Literal["input_text"]
    text: str


class ResponseOutputTextParam(OpenAIRequestModel):
    """Text an assistant wrote earlier (an `output_text` part sent back as history)."""

    type: Literal["output_text"]
    text: str
    # Sent back as the output carried them; kept as plain data and not used.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class ResponseRefusalParam(OpenAIRequestModel):
    type: Literal["refusal"]
    refusal: str


class ResponseUnsupportedContentParam(OpenAIRequestModel):
    """An image, file or audio part: parsed only so the request check can refuse it by position."""

    type: Literal["input_image", "input_file", "input_audio"]


MessageContentPart = Annotated[
    Union[ResponseInputTextParam, ResponseOutputTextParam, ResponseRefusalParam, ResponseUnsupportedContentParam],
    Field(discriminator="type"),
]
FunctionOutputPart = Annotated[
    Union[ResponseInputTextParam, ResponseUnsupportedContentParam],
    Field(discriminator="type"),
]
# The spec puts no minItems on these lists; an empty list reads as empty text.
MessageContent = string_or_array(list[MessageContentPart])
FunctionOutput = string_or_array(list[FunctionOutputPart])

_UNSUPPORTED_PART = {"input_image": "Image", "input_file": "File", "input_audio": "Audio"}


# =============================================================================================
# Request: input items
# =============================================================================================


class ResponseInputMessageParam(OpenAIRequestModel):
    """EasyInputMessage / InputMessage, and an assistant OutputMessage sent back as history.

    Text parts are read by meaning, not by their role-specific name: `input_text` in an assistant
    message or `output_text` in a user message is text all the same (OpenAI refuses both).
    """

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: MessageContent
    id: str | None = None
    status: ItemStatus | None = None


class ResponseFunctionToolCallParam(OpenAIRequestModel):
    """A function call the model made earlier (`arguments` is JSON text, as the model wrote it)."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class ResponseFunctionCallOutputParam(OpenAIRequestModel):
    """The caller's result for one function call, matched to it by `call_id`."""

    type: Literal["function_call_output"]
    # The spec's bounds for FunctionCallOutputItemParam.call_id.
    call_id: Annotated[str, Field(min_length=1, max_length=64)]
    output: FunctionOutput
    id: str | None = None
    status: ItemStatus | None = None


class ResponseReasoningItemParam(OpenAIRequestModel):
    """A reasoning item sent back from an earlier output. Stored and listed, not shown to the model."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: ItemStatus | None = None


def _item_tag(value: Any) -> str | None:
    # A message may leave out `type` (EasyInputMessage); anything without a type is read as one, so
    # the caller hears which message field is missing rather than "no type".
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    if isinstance(value, ResponseInputMessageParam):
        return "message"
    return getattr(value, "type", "message")


ResponseInputItemParam = Annotated[
    Union[
        Annotated[ResponseInputMessageParam, Tag("message")],
        Annotated[ResponseFunctionToolCallParam, Tag("function_call")],
        Annotated[ResponseFunctionCallOutputParam, Tag("function_call_output")],
        Annotated[ResponseReasoningItemParam, Tag("reasoning")],
    ],
    Discriminator(_item_tag),
]
ResponseInput = string_or_array(list[ResponseInputItemParam])


# =============================================================================================
# Request: tools, tool choice, text format
# =============================================================================================


class FunctionToolParam(OpenAIRequestModel):
    """A function tool, flat as the Responses API writes it (chat nests it under `function`)."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    # A JSON Schema object; kept as a plain dict (its keys are the caller's, not ours).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class UnsupportedToolParam(OpenAIRequestModel):
    """Any other tool type: parsed only so the request check can refuse it by position."""

    type: str


def _tool_tag(value: Any) -> str:
    # Tags appear in error locations; they must not be keys a caller's tool could have ("function").
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function_tool" if kind == "function" or kind is None else "other_tool"


ToolParam = Annotated[
    Union[Annotated[FunctionToolParam, Tag("function_tool")], Annotated[UnsupportedToolParam, Tag("other_tool")]],
    Discriminator(_tool_tag),
]


class ToolChoiceFunctionParam(OpenAIRequestModel):
    type: Literal["function"]
    name: str


class ToolChoiceAllowedParam(OpenAIRequestModel):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    # Tool definitions as in `tools` ({"type": "function", "name": ...}); loose, as the spec has them.
    tools: list[dict[str, Any]]


class UnsupportedToolChoiceParam(OpenAIRequestModel):
    """A hosted-tool choice ({"type": "web_search_preview"}, MCP, ...): refused by the request check."""

    type: str


def _tool_choice_tag(value: Any) -> str:
    if isinstance(value, str):
        return "mode"
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return "function"  # so a choice without `type` is told what it is missing
    return kind if kind in ("function", "allowed_tools") else "other"


ToolChoiceParam = Annotated[
    Union[
        Annotated[Literal["none", "auto", "required"], Tag("mode")],
        Annotated[ToolChoiceFunctionParam, Tag("function")],
        Annotated[ToolChoiceAllowedParam, Tag("allowed_tools")],
        Annotated[UnsupportedToolChoiceParam, Tag("other")],
    ],
    Discriminator(_tool_choice_tag),
]


class TextFormatTextParam(OpenAIRequestModel):
    type: Literal["text"]


class TextFormatJSONObjectParam(OpenAIRequestModel):
    type: Literal["json_object"]


class TextFormatJSONSchemaParam(OpenAIRequestModel):
    """The Responses form of a JSON schema format: flat, not nested under `json_schema` as in chat."""

    type: Literal["json_schema"]
    name: FunctionName
    # Python name `schema_` because `schema` shadows a BaseModel method; the wire name is "schema".
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_chat_style(cls, data: Any) -> Any:
        # Chat nests these under `json_schema`; say so instead of "missing name" at a path that
        # the discriminator's tag would make read like `text.format.json_schema.name`.
        if isinstance(data, dict) and "json_schema" in data and "name" not in data:
            raise invalid_request(
                "text.format.name",
                "Missing required parameter: 'text.format.name'. In the Responses API 'name' and 'schema' "
                "go directly in 'text.format', not under 'json_schema'.",
            )
        return data


TextFormatParam = Annotated[
    Union[TextFormatTextParam, TextFormatJSONObjectParam, TextFormatJSONSchemaParam],
    Field(discriminator="type"),
]


class ResponseTextParam(OpenAIRequestModel):
    format: TextFormatParam | None = None
    # Accepted and echoed; a local model has no verbosity knob.
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseStreamOptionsParam(OpenAIRequestModel):
    # OpenAI pads deltas with random text against size side channels; we never do, so it is a no-op.
    include_obfuscation: bool | None = None


IncludeValue = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
# Spec (Metadata): up to 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


# =============================================================================================
# Request
# =============================================================================================


class ResponseCreateRequest(OpenAIRequestModel):
    """Body of POST /v1/responses.

    `None` on an optional sampling field means "not given": the chat path applies the model's own
    default (its generation config) and then OpenAI's.
    """

    model: str
    # Optional in the spec (a `prompt` or `conversation` could supply it); to_chat_request refuses a
    # request that ends up with nothing to answer.
    input: ResponseInput | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    # The spec's minimum is 16 (OpenAI's own floor); any positive cap means the same to us.
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseTextParam | None = None
    stream: bool | None = False
    stream_options: ResponseStreamOptionsParam | None = None
    store: bool | None = True
    metadata: Metadata | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[IncludeValue] | None = None
    # Reasoning effort and summaries are OpenAI-model settings; accepted (SDKs send them) and echoed.
    reasoning: dict[str, Any] | None = None
    # Declared so that asking for them is refused, not ignored (see _check_unsupported).
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    # --- vLLM extensions (same names and meaning as on our chat endpoint) ---
    seed: Seed | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    stop: StopSequences | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def wants_logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or ()) or self.top_logprobs is not None

    def function_tools(self) -> list[FunctionToolParam]:
        return [tool for tool in self.tools or () if isinstance(tool, FunctionToolParam)]

    @model_validator(mode="after")
    def _check_request(self) -> ResponseCreateRequest:
        self._check_unsupported()
        self._check_tools()
        if self.stream_options is not None and not self.stream:
            raise invalid_request(
                "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            )
        if self.min_tokens is not None and self.max_output_tokens is not None:
            if self.min_tokens > self.max_output_tokens:
                raise invalid_request(
                    "min_tokens", "'min_tokens' must be less than or equal to 'max_output_tokens'."
                )
        return self

    def _check_unsupported(self) -> None:
        if self.background:
            raise _unsupported(
                "background", "Background responses are not supported by this server.", "unsupported_parameter"
            )
        if self.conversation is not None:
            raise _unsupported(
                "conversation",
                "The Conversations API is not supported by this server; use 'previous_response_id'.",
                "unsupported_parameter",
            )
        if self.prompt is not None:
            raise _unsupported("prompt", "Prompt templates are not supported by this server.", "unsupported_parameter")
        for i, tool in enumerate(self.tools or ()):
            if isinstance(tool, UnsupportedToolParam):
                raise _tool_type_error(f"tools[{i}].type", tool.type)
        if not isinstance(self.input, list):
            return
        for i, item in enumerate(self.input):
            if isinstance(item, ResponseInputMessageParam) and isinstance(item.content, list):
                parts, where = item.content, f"input[{i}].content"
            elif isinstance(item, ResponseFunctionCallOutputParam) and isinstance(item.output, list):
                parts, where = item.output, f"input[{i}].output"
            else:
                continue
            for j, part in enumerate(parts):
                if isinstance(part, ResponseUnsupportedContentParam):
                    raise _unsupported(
                        f"{where}[{j}]",
                        f"{_UNSUPPORTED_PART[part.type]} input ('{part.type}') is not supported by this server; "
                        "only text input is.",
                        "unsupported_content",
                    )

    def _check_tools(self) -> None:
        names = {tool.name for tool in self.function_tools()}
        choice = self.tool_choice
        if isinstance(choice, UnsupportedToolChoiceParam):
            raise _tool_type_error("tool_choice.type", choice.type)
        # As chat.py: 'none' asks for nothing a tool-less request cannot honour, so it is let through.
        if choice is not None and choice != "none" and not names:
            raise invalid_request("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if isinstance(choice, ToolChoiceFunctionParam) and choice.name not in names:
            raise invalid_request(
                "tool_choice", f"Tool choice function '{_shown(choice.name)}' is not one of the 'tools'."
            )
        if isinstance(choice, ToolChoiceAllowedParam):
            for j, tool in enumerate(choice.tools):
                kind = tool.get("type")
                if kind != "function":
                    raise _tool_type_error(f"tool_choice.tools[{j}].type", kind)
                if tool.get("name") not in names:
                    raise invalid_request(
                        f"tool_choice.tools[{j}].name",
                        f"Allowed tool '{_shown(tool.get('name'))}' is not one of the 'tools'.",
                    )


def _tool_type_error(param: str, kind: Any) -> PydanticCustomError:
    if kind in BUILTIN_TOOL_TYPES:
        return _unsupported(
            param,
            f"The built-in tool '{kind}' is not supported by this server; only 'function' tools are.",
            "unsupported_tool",
        )
    return _unsupported(
        param, f"Invalid tool type: '{_shown(kind)}'. Supported values are: 'function'.", "invalid_value"
    )


# =============================================================================================
# Input items in stored (resource) form
# =============================================================================================


def _text_parts(content: str | list[Any], kind: str) -> list[dict[str, Any]]:
    """Message content as parts of one kind: `input_text` for input roles, `output_text` for the
    assistant (whose refusals stay refusals)."""
    parts = [ResponseInputTextParam(type="input_text", text=content)] if isinstance(content, str) else content
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, ResponseRefusalParam) and kind == "output_text":
            out.append({"type": "refusal", "refusal": part.refusal})
        elif isinstance(part, ResponseRefusalParam):
            out.append({"type": kind, "text": part.refusal})
        elif kind == "output_text":
            out.append({"type": "output_text", "text": part.text, "annotations": [], "logprobs": []})
        else:
            out.append({"type": kind, "text": part.text})
    return out


def input_items(request: ResponseCreateRequest) -> list[dict[str, Any]]:
    """This request's input as items in OpenAI's resource form (`ItemResource`), one per input item.

    A string input is one user message. Every item gets an id (the caller's, unless an earlier item
    of this input already took it: ids are page cursors and must be unique) and a `status`.
    Assistant messages take OpenAI's OutputMessage shape. Index i of the result is `input[i]`.
    """
    if request.input is None:
        return []
    if isinstance(request.input, str):
        return [
            {
                "id": make_id("msg"),
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": request.input}],
                "status": "completed",
            }
        ]
    items: list[dict[str, Any]] = []
    seen: set[str] = set()

    def item_id(given: str | None, prefix: str) -> str:
        chosen = given if given and given not in seen else make_id(prefix)
        seen.add(chosen)
        return chosen

    for item in request.input:
        if isinstance(item, ResponseInputMessageParam):
            kind = "output_text" if item.role == "assistant" else "input_text"
            items.append(
                {
                    "id": item_id(item.id, "msg"),
                    "type": "message",
                    "role": item.role,
                    "content": _text_parts(item.content, kind),
                    "status": item.status or "completed",
                }
            )
        elif isinstance(item, ResponseFunctionToolCallParam):
            items.append(
                {
                    "id": item_id(item.id, "fc"),
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": item.status or "completed",
                }
            )
        elif isinstance(item, ResponseFunctionCallOutputParam):
            output = item.output if isinstance(item.output, str) else _text_parts(item.output, "input_text")
            items.append(
                {
                    "id": item_id(item.id, "fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output,
                    "status": item.status or "completed",
                }
            )
        else:
            reasoning: dict[str, Any] = {"id": item_id(item.id, "rs"), "type": "reasoning", "summary": item.summary}
            for key in ("content", "encrypted_content", "status"):
                if getattr(item, key) is not None:
                    reasoning[key] = getattr(item, key)
            items.append(reasoning)
    return items


# =============================================================================================
# Responses request -> chat request
# =============================================================================================


def _request_error(param: str, message: str, code: str | None = None) -> ValidationError:
    """A ValidationError like the request model's own, so one error mapper handles both."""
    ctx: dict[str, Any] = {"param": param}
    if code is not None:
        ctx["code"] = code
    detail: InitErrorDetails = {
        "type": PydanticCustomError("invalid_request", message, ctx),
        "loc": (param,),
        "input": None,
    }
    return ValidationError.from_exception_data("ResponseCreateRequest", [detail])


def _joined_text(parts: Any) -> str:
    """Stored content parts as one string, joined as our chat template joins text parts."""
    if isinstance(parts, str):
        return parts
    texts = []
    for part in parts or ():
        if isinstance(part, dict):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                texts.append(text)
    return "\n".join(texts)


def _chat_messages(located: list[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    """Responses items (each with the param that names it) -> chat messages.

    Function calls made in one turn are separate items here and one assistant message with
    `tool_calls` in chat: consecutive calls join the assistant message right before them, if any.
    """
    messages: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    # The assistant message that a function_call item would join; any other message ends it.
    open_turn: dict[str, Any] | None = None
    for item, param in located:
        kind = item.get("type", "message")
        if kind == "message":
            message = {"role": item.get("role"), "content": _joined_text(item.get("content"))}
            messages.append(message)
            open_turn = message if message["role"] == "assistant" else None
        elif kind == "function_call":
            call_id = item.get("call_id")
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if open_turn is None:
                open_turn = {"role": "assistant", "content": None}
                messages.append(open_turn)
            open_turn.setdefault("tool_calls", []).append(call)
            call_ids.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in call_ids:
                raise _request_error(
                    f"{param}.call_id" if param.startswith("input[") else param,
                    f"No tool call found for function call output with call_id '{_shown(call_id)}'.",
                    "invalid_value",
                )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _joined_text(item.get("output"))})
            open_turn = None
        # Reasoning items are not shown to the model: a chat prompt has no place for them.
    return messages


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, ToolChoiceFunctionParam):
        return {"type": "function", "function": {"name": choice.name}}
    if isinstance(choice, ToolChoiceAllowedParam):
        tools = [{"type": "function", "function": {"name": tool["name"]}} for tool in choice.tools]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.mode, "tools": tools}}
    return choice


def _chat_response_format(text: ResponseTextParam | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if isinstance(fmt, TextFormatJSONObjectParam):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJSONSchemaParam):
        json_schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            json_schema["description"] = fmt.description
        if fmt.strict is not None:
            json_schema["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": json_schema}
    return None


# Chat parameter -> the Responses parameter a caller wrote, for errors the chat model raises.
_CHAT_TO_RESPONSES_PARAM = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}
# Fields copied as they are when given (same name and meaning on both endpoints).
_SAME_NAME_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "user",
    "parallel_tool_calls",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "cache_salt",
    "chat_template_kwargs",
)


def to_chat_request(request: ResponseCreateRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that generates this response.

    `history` is the stored conversation of the `previous_response_id` chain (items in resource
    form, oldest first); it precedes this request's input. `instructions` become a leading system
    message and, as in OpenAI, come only from this request, never from earlier responses.
    `stream` is always false: the route drives streaming itself.

    Raises `ValidationError` (type `invalid_request`, `ctx["param"]` a Responses parameter).
    """
    located = [(item, "previous_response_id") for item in history]
    current = input_items(request)
    if isinstance(request.input, str):
        located += [(item, "input") for item in current]
    else:
        located += [(item, f"input[{i}]") for i, item in enumerate(current)]
    messages = _chat_messages(located)
    if request.instructions is not None:
        messages.insert(0, {"role": "system", "content": request.instructions})
    if not messages:
        raise _request_error("input", "Missing required parameter: 'input'.", "missing_required_parameter")

    body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": False}
    for name in _SAME_NAME_FIELDS:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    if request.wants_logprobs():
        body["logprobs"] = True
        if request.top_logprobs is not None:
            body["top_logprobs"] = request.top_logprobs
    tools = request.function_tools()
    if tools:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in tools
        ]
    if request.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(request.tool_choice)
    response_format = _chat_response_format(request.text)
    if response_format is not None:
        body["response_format"] = response_format
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        # Everything a caller can write was checked above, so this is a stored history that no
        # longer reads as chat, or a chat-only rule: report it under the Responses field's name.
        error = exc.errors(include_url=False)[0]
        where = (error.get("ctx") or {}).get("param") if error["type"] == "invalid_request" else None
        field = str(where or (error["loc"][0] if error["loc"] else "messages")).split(".")[0].split("[")[0]
        param = _CHAT_TO_RESPONSES_PARAM.get(field, field)
        message = str(error["msg"]) if where else f"Invalid '{param}': {_shown(error['msg'])}."
        raise _request_error(param, message, "invalid_value") from None


# =============================================================================================
# Response: output items
# =============================================================================================


class OutputTextTopLogprob(OpenAIResponseModel):
    token: str
    logprob: Logprob
    bytes: list[int] = Field(default_factory=list)


class OutputTextLogprob(OpenAIResponseModel):
    """One token's logprob: the spec's LogProb (in `output_text`) and ResponseLogProb (in deltas)."""

    token: str
    logprob: Logprob
    bytes: list[int] = Field(default_factory=list)
    top_logprobs: list[OutputTextTopLogprob] = Field(default_factory=list)


class OutputText(OpenAIResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    # Citations from hosted tools; never any here, but the key is required.
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    # Required by the spec; empty unless the request included `message.output_text.logprobs`.
    logprobs: list[OutputTextLogprob] = Field(default_factory=list)


class OutputRefusal(OpenAIResponseModel):
    type: Literal["refusal"] = "refusal"
    refusal: str


OutputMessageContent = Annotated[Union[OutputText, OutputRefusal], Field(discriminator="type")]


class ResponseOutputMessage(OpenAIResponseModel):
    id: str = Field(default_factory=lambda: make_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "completed"
    content: list[OutputMessageContent] = Field(default_factory=list)


class ResponseFunctionToolCall(OpenAIResponseModel):
    id: str = Field(default_factory=lambda: make_id("fc"))
    type: Literal["function_call"] = "function_call"
    call_id: str = Field(default_factory=lambda: make_id("call"))
    name: str
    # JSON text, as the model wrote it.
    arguments: str
    status: ItemStatus = "completed"


class ReasoningText(OpenAIResponseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ResponseReasoningItem(OpenAIResponseModel):
    """What a reasoning parser took out of the text (think blocks), as OpenAI's `reasoning` item."""

    id: str = Field(default_factory=lambda: make_id("rs"))
    type: Literal["reasoning"] = "reasoning"
    # Required by the spec; we write no summaries.
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus = "completed"


ResponseOutputItem = Annotated[
    Union[ResponseOutputMessage, ResponseFunctionToolCall, ResponseReasoningItem],
    Field(discriminator="type"),
]


# =============================================================================================
# Response: the response object
# =============================================================================================


class InputTokensDetails(OpenAIResponseModel):
    # Prompt tokens served from the prefix cache.
    cached_tokens: int = 0
    # Required by the spec; our prefix cache has no separately billed writes.
    cache_write_tokens: int = 0


class OutputTokensDetails(OpenAIResponseModel):
    # Tokens a reasoning parser moved out of the message text.
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(OpenAIResponseModel):
    """Why a response failed (`status: "failed"`); `code` is one of the spec's ResponseErrorCode."""

    code: str = "server_error"
    message: str


class IncompleteDetails(OpenAIResponseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseFunctionTool(OpenAIResponseModel):
    """A function tool as echoed in the response: `parameters` and `strict` always present."""

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _always_emit: ClassVar[frozenset[str]] = frozenset({"description", "parameters", "strict"})


class ToolChoiceFunction(OpenAIResponseModel):
    type: Literal["function"] = "function"
    name: str


class ToolChoiceAllowed(OpenAIResponseModel):
    type: Literal["allowed_tools"] = "allowed_tools"
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class TextFormatText(OpenAIResponseModel):
    type: Literal["text"] = "text"


class TextFormatJSONObject(OpenAIResponseModel):
    type: Literal["json_object"] = "json_object"


class TextFormatJSONSchema(OpenAIResponseModel):
    type: Literal["json_schema"] = "json_schema"
    name: str
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, validate_by_name=True)


TextFormat = Annotated[Union[TextFormatText, TextFormatJSONObject, TextFormatJSONSchema], Field(discriminator="type")]


class ResponseTextConfig(OpenAIResponseModel):
    format: TextFormat = Field(default_factory=TextFormatText)
    verbosity: Literal["low", "medium", "high"] | None = None


ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class ResponseObject(OpenAIResponseModel):
    """OpenAI's `Response`: the body of POST/GET /v1/responses and the payload of lifecycle events.

    Required-nullable fields are always written (`null` when unset), as OpenAI does; `usage` and
    `user` are not nullable in the spec and are left out until there is one.
    """

    id: str = Field(default_factory=lambda: make_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=now_unix)
    status: ResponseStatus = "in_progress"
    # Only set once the status is "completed".
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[ResponseOutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    background: bool = False
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    text: ResponseTextConfig = Field(default_factory=ResponseTextConfig)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | ToolChoiceAllowed = "auto"
    tools: list[ResponseFunctionTool] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    _always_emit: ClassVar[frozenset[str]] = frozenset(
        {
            "completed_at",
            "error",
            "incomplete_details",
            "instructions",
            "max_output_tokens",
            "previous_response_id",
            "reasoning",
            "temperature",
            "top_p",
            "top_logprobs",
        }
    )

    @classmethod
    def for_request(cls, request: ResponseCreateRequest, **fields: Any) -> ResponseObject:
        """A response that echoes the request's settings, as OpenAI's does; `fields` set the rest
        (id, status, output, usage, ...) and override any echoed value (e.g. the served `model`)."""
        echoed: dict[str, Any] = {
            "model": request.model,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": request.reasoning,
            "store": request.store is not False,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_logprobs": request.top_logprobs,
            "text": _echo_text(request.text),
            "tool_choice": _echo_tool_choice(request.tool_choice),
            "tools": [ResponseFunctionTool(**tool.model_dump(exclude={"type"})) for tool in request.function_tools()],
            "truncation": request.truncation or "disabled",
            "metadata": dict(request.metadata or {}),
        }
        if request.user is not None:
            echoed["user"] = request.user
        return cls(**{**echoed, **fields})


def _echo_text(text: ResponseTextParam | None) -> ResponseTextConfig:
    fmt = text.format if text is not None else None
    echoed: TextFormatText | TextFormatJSONObject | TextFormatJSONSchema
    if isinstance(fmt, TextFormatJSONSchemaParam):
        echoed = TextFormatJSONSchema(
            name=fmt.name, schema=fmt.schema_, description=fmt.description, strict=fmt.strict
        )
    elif isinstance(fmt, TextFormatJSONObjectParam):
        echoed = TextFormatJSONObject()
    else:
        echoed = TextFormatText()
    config = ResponseTextConfig(format=echoed)
    if text is not None and text.verbosity is not None:
        config.verbosity = text.verbosity
    return config


def _echo_tool_choice(choice: Any) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, ToolChoiceFunctionParam):
        return ToolChoiceFunction(name=choice.name)
    if isinstance(choice, ToolChoiceAllowedParam):
        return ToolChoiceAllowed(mode=choice.mode, tools=choice.tools)
    return choice


class ResponseDeleted(OpenAIResponseModel):
    """Body of DELETE /v1/responses/{id} (the spec's example; it declares no schema)."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# =============================================================================================
# Stream events
# =============================================================================================


class _StreamEvent(OpenAIResponseModel):
    # Declared here so that `type` comes first on the wire; each event narrows it to its literal.
    type: str
    # Numbered from 0 across the whole stream, in the order sent.
    sequence_number: int


class ResponseCreatedEvent(_StreamEvent):
    type: Literal["response.created"] = "response.created"
    response: ResponseObject


class ResponseInProgressEvent(_StreamEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: ResponseObject


class ResponseCompletedEvent(_StreamEvent):
    type: Literal["response.completed"] = "response.completed"
    response: ResponseObject


class ResponseIncompleteEvent(_StreamEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: ResponseObject


class ResponseFailedEvent(_StreamEvent):
    type: Literal["response.failed"] = "response.failed"
    response: ResponseObject


class ResponseOutputItemAddedEvent(_StreamEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: ResponseOutputItem


class ResponseOutputItemDoneEvent(_StreamEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: ResponseOutputItem


class ResponseContentPartAddedEvent(_StreamEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: Annotated[Union[OutputText, OutputRefusal, ReasoningText], Field(discriminator="type")]


class ResponseContentPartDoneEvent(_StreamEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: Annotated[Union[OutputText, OutputRefusal, ReasoningText], Field(discriminator="type")]


class ResponseTextDeltaEvent(_StreamEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    # Required by the spec: the delta's tokens when logprobs were asked for, else empty.
    logprobs: list[OutputTextLogprob] = Field(default_factory=list)


class ResponseTextDoneEvent(_StreamEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[OutputTextLogprob] = Field(default_factory=list)


class ResponseFunctionCallArgumentsDeltaEvent(_StreamEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(_StreamEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ResponseReasoningTextDeltaEvent(_StreamEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseReasoningTextDoneEvent(_StreamEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseErrorEvent(_StreamEvent):
    """A failure before or outside a response (`code` and `param` required, nullable)."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None

    _always_emit: ClassVar[frozenset[str]] = frozenset({"code", "param"})


ResponseStreamEvent = Annotated[
    Union[
        ResponseCreatedEvent,
        ResponseInProgressEvent,
        ResponseCompletedEvent,
        ResponseIncompleteEvent,
        ResponseFailedEvent,
        ResponseOutputItemAddedEvent,
        ResponseOutputItemDoneEvent,
        ResponseContentPartAddedEvent,
        ResponseContentPartDoneEvent,
        ResponseTextDeltaEvent,
        ResponseTextDoneEvent,
        ResponseFunctionCallArgumentsDeltaEvent,
        ResponseFunctionCallArgumentsDoneEvent,
        ResponseReasoningTextDeltaEvent,
        ResponseReasoningTextDoneEvent,
        ResponseErrorEvent,
    ],
    Field(discriminator="type"),
]
