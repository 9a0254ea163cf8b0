"""/v1/chat/completions on the wire: the request, its messages and tools, the response and chunks.

In: a JSON body validated into `ChatCompletionRequest` (OpenAI's CreateChatCompletionRequest, the
fields that make sense for a local model, plus vLLM's sampling and chat-template extensions). Out:
`ChatCompletionResponse` (object "chat.completion") or a stream of `ChatCompletionChunk` (object
"chat.completion.chunk"), each dumping to exactly OpenAI's JSON. Also here: vLLM's chat-form
/tokenize request, which reuses the message types.

Request-side names follow the official `openai` Python SDK (`...Param`); response-side names follow
the brief/vLLM where the SDK's (`Choice`, `ChoiceDelta`) would collide between endpoints.

OpenAI request fields that do not apply to a local model (`service_tier`, `store`, `metadata`,
`modalities`, `audio`, `prediction`, `web_search_options`, `reasoning_effort`, `verbosity`,
`prompt_cache_key`, ...) are deliberately not declared: they land in `unknown_fields()` so the
server can tell the caller they were ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from heron.server.protocol.common import (
    ChatCompletionLogprobs,
    CompletionUsage,
    FunctionName,
    GenerationRequest,
    MaxTokens,
    OpenAIRequestModel,
    OpenAIResponseModel,
    PromptLogprobs,
    TokenizeCompletionRequest,
    invalid_request,
    now_unix,
    string_or_array,
)

# =============================================================================================
# Request: content parts
# =============================================================================================


class ChatCompletionContentPartTextParam(OpenAIRequestModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIRequestModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ChatCompletionContentPartImageParam(OpenAIRequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(OpenAIRequestModel):
    data: str
    format: Literal["wav", "mp3"]


class ChatCompletionContentPartInputAudioParam(OpenAIRequestModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(OpenAIRequestModel):
    filename: str | None = None
    file_data: str | None = None
    file_id: str | None = None


class ChatCompletionContentPartFileParam(OpenAIRequestModel):
    type: Literal["file"]
    file: FileData


class ChatCompletionContentPartRefusalParam(OpenAIRequestModel):
    type: Literal["refusal"]
    refusal: str


# User messages may carry any of OpenAI's input modalities. The protocol layer accepts the shapes;
# whether the served model can use an image, audio or file is the services layer's call, so the
# caller gets "this model does not accept images" instead of a schema error.
ChatCompletionContentPartParam = Annotated[
    Union[
        ChatCompletionContentPartTextParam,
        ChatCompletionContentPartImageParam,
        ChatCompletionContentPartInputAudioParam,
        ChatCompletionContentPartFileParam,
    ],
    Field(discriminator="type"),
]
AssistantContentPartParam = Annotated[
    Union[ChatCompletionContentPartTextParam, ChatCompletionContentPartRefusalParam],
    Field(discriminator="type"),
]
# The spec gives every array form of `content` minItems 1.
TextContent = string_or_array(Annotated[list[ChatCompletionContentPartTextParam], Field(min_length=1)])
UserContent = string_or_array(Annotated[list[ChatCompletionContentPartParam], Field(min_length=1)])
AssistantContent = string_or_array(Annotated[list[AssistantContentPartParam], Field(min_length=1)])


# =============================================================================================
# Request: messages
# =============================================================================================


class FunctionCallParam(OpenAIRequestModel):
    """A function call the assistant made earlier in the conversation (`arguments` is JSON text)."""

    name: str
    arguments: str


class ChatCompletionMessageToolCallParam(OpenAIRequestModel):
    # The spec also allows `type: "custom"` (free-form tools); Heron serves function tools only.
    id: str
    type: Literal["function"]
    function: FunctionCallParam


class ChatCompletionSystemMessageParam(OpenAIRequestModel):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class ChatCompletionDeveloperMessageParam(OpenAIRequestModel):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class ChatCompletionUserMessageParam(OpenAIRequestModel):
    role: Literal["user"]
    content: UserContent
    name: str | None = None


class ChatCompletionAssistantMessageParam(OpenAIRequestModel):
    role: Literal["assistant"]
    content: AssistantContent | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ChatCompletionMessageToolCallParam] | None = None
    function_call: FunctionCallParam | None = None
    # The thinking of an earlier answer (vLLM's names, both accepted): passed to the chat template
    # as message fields (under every name templates read, see chat_template.py), which shows it
    # only if it reads one (Qwen3's reads `reasoning_content`).
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ChatCompletionAssistantMessageParam:
        # Spec: `content` is "Required unless `tool_calls` or `function_call` is specified."
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise invalid_request(
                "content",
                "An assistant message needs 'content' unless it has 'tool_calls' or 'function_call'.",
            )
        return self


class ChatCompletionToolMessageParam(OpenAIRequestModel):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class ChatCompletionFunctionMessageParam(OpenAIRequestModel):
    """Legacy (deprecated) result of a `function_call`; `content` is required but may be null."""

    role: Literal["function"]
    content: str | None
    name: str


ChatCompletionMessageParam = Annotated[
    Union[
        ChatCompletionSystemMessageParam,
        ChatCompletionDeveloperMessageParam,
        ChatCompletionUserMessageParam,
        ChatCompletionAssistantMessageParam,
        ChatCompletionToolMessageParam,
        ChatCompletionFunctionMessageParam,
    ],
    Field(discriminator="role"),
]


# =============================================================================================
# Request: tools, tool choice, legacy functions, response format
# =============================================================================================


class FunctionDefinition(OpenAIRequestModel):
    name: FunctionName
    description: str | None = None
    # A JSON Schema object; kept as a plain dict (its keys are the caller's, not ours).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionToolParam(OpenAIRequestModel):
    # The spec's `custom` tools (free-form grammar input) are not served; they fail validation here.
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequestModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIRequestModel):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(OpenAIRequestModel):
    mode: Literal["auto", "required"]
    # Tool definitions in the same shape as `tools` items; kept loose as the spec does.
    tools: list[dict[str, Any]]


class ChatCompletionAllowedToolChoiceParam(OpenAIRequestModel):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ChatCompletionToolChoiceOptionParam = (
    Literal["none", "auto", "required"]
    | Annotated[
        Union[ChatCompletionNamedToolChoiceParam, ChatCompletionAllowedToolChoiceParam],
        Field(discriminator="type"),
    ]
)


class FunctionDefinitionLegacy(OpenAIRequestModel):
    """An item of the deprecated `functions` list (OpenAI's ChatCompletionFunctions)."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None


# =============================================================================================
# Request
# =============================================================================================


class ChatCompletionRequest(GenerationRequest):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatCompletionMessageParam], Field(min_length=1)]
    # Deprecated by OpenAI in favour of max_completion_tokens; if both are given the latter wins.
    # OpenAI rejects 0 here ("Expected a value >= 1").
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ChatCompletionToolParam] | None = None
    tool_choice: ChatCompletionToolChoiceOptionParam | None = None
    parallel_tool_calls: bool | None = True
    # Deprecated predecessors of tools / tool_choice; the spec bounds `functions` to 1..128 items.
    functions: Annotated[list[FunctionDefinitionLegacy], Field(min_length=1, max_length=128)] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    # --- vLLM extensions ---
    # Extra variables for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # Continue the last (assistant) message instead of starting a new one: prefill.
    continue_final_message: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            # Spec: "`logprobs` must be set to `true` if this parameter is used."
            raise invalid_request("top_logprobs", "'logprobs' must be set to true when 'top_logprobs' is used.")

        # OpenAI: "'tool_choice' is only allowed when 'tools' are specified." We let "none" through
        # without tools, as vLLM does: it asks for nothing a tool-less request cannot honour.
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise invalid_request("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            names = {tool.function.name for tool in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise invalid_request("tool_choice", "The function named in 'tool_choice' is not one of the 'tools'.")

        if self.function_call is not None and self.function_call != "none" and not self.functions:
            raise invalid_request("function_call", "'function_call' is only allowed when 'functions' are specified.")
        if isinstance(self.function_call, NamedFunction):
            names = {function.name for function in self.functions or ()}
            if self.function_call.name not in names:
                raise invalid_request(
                    "function_call", "The function named in 'function_call' is not one of the 'functions'."
                )

        if self.continue_final_message:
            # vLLM rejects continue_final_message with the default add_generation_prompt=True, so
            # every caller has to send both. We only reject an explicit contradiction and otherwise
            # let continue_final_message imply no generation prompt.
            if "add_generation_prompt" in self.model_fields_set and self.add_generation_prompt:
                raise invalid_request(
                    "continue_final_message",
                    "'continue_final_message' and 'add_generation_prompt' cannot both be true.",
                )
            self.add_generation_prompt = False
            if self.messages[-1].role != "assistant":
                raise invalid_request(
                    "continue_final_message",
                    "'continue_final_message' needs the last message to be an assistant message.",
                )
        return self


# =============================================================================================
# Response (non-streaming)
# =============================================================================================

ChatFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class FunctionCall(OpenAIResponseModel):
    """A function call the model made: `arguments` is JSON text, as the model wrote it."""

    name: str
    arguments: str


class ChatCompletionMessageToolCall(OpenAIResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(OpenAIResponseModel):
    """`choices[].message`: `content` and `refusal` are required and nullable."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    # Omitted when there are none, as OpenAI does (the spec does not make it nullable).
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    function_call: FunctionCall | None = None
    # vLLM extension: the text a reasoning parser took out of `content` (`reasoning`, vLLM's new
    # name, and `reasoning_content`, its old one: the same text in both).
    reasoning: str | None = None
    reasoning_content: str | None = None

    _always_emit: ClassVar[frozenset[str]] = frozenset({"content", "refusal"})


class ChatCompletionResponseChoice(OpenAIResponseModel):
    index: int
    message: ChatCompletionMessage
    # Required and nullable: null unless the request asked for logprobs.
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: ChatFinishReason
    # vLLM extension: the stop string or token id that ended the choice, when one did.
    stop_reason: int | str | None = None
    # vLLM extension (return_token_ids): the generated token ids.
    token_ids: list[int] | None = None

    _always_emit: ClassVar[frozenset[str]] = frozenset({"logprobs"})


class ChatCompletionResponse(OpenAIResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_unix)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: CompletionUsage | None = None
    # vLLM extensions: prompt_logprobs, and (return_token_ids) the prompt's token ids.
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


# =============================================================================================
# Stream chunks
# =============================================================================================


class ChoiceDeltaFunctionCall(OpenAIResponseModel):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCallFunction(OpenAIResponseModel):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(OpenAIResponseModel):
    """A piece of a tool call: the first piece has id, type and name; later ones add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(OpenAIResponseModel):
    """`choices[].delta`: only what is new. Fields left unset are omitted.

    OpenAI's first delta is `{"role": "assistant", "content": "", "refusal": null}` and a tool-call
    delta carries `"content": null`; pass `content=None` / `refusal=None` explicitly to get the nulls.
    """

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None
    function_call: ChoiceDeltaFunctionCall | None = None
    # The reasoning streamed: the same text under both names, as on the message.
    reasoning: str | None = None
    reasoning_content: str | None = None

    _null_when_set: ClassVar[frozenset[str]] = frozenset({"content", "refusal"})


class ChatCompletionResponseStreamChoice(OpenAIResponseModel):
    index: int
    delta: ChoiceDelta
    # OpenAI writes `"logprobs": null` on every chunk choice without logprobs.
    logprobs: ChatCompletionLogprobs | None = None
    # Required and nullable: null on every chunk but the last of the choice.
    finish_reason: ChatFinishReason | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: what this chunk added

    _always_emit: ClassVar[frozenset[str]] = frozenset({"logprobs", "finish_reason"})


class ChatCompletionChunk(OpenAIResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_unix)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseStreamChoice]
    # With stream_options.include_usage, every chunk carries `usage` (null until the final,
    # choice-less usage chunk); without it the key is absent. So: null only when set explicitly.
    usage: CompletionUsage | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the first chunk

    _null_when_set: ClassVar[frozenset[str]] = frozenset({"usage"})


# =============================================================================================
# vLLM /tokenize, chat form
# =============================================================================================


class TokenizeChatRequest(OpenAIRequestModel):
    model: str | None = None
    messages: Annotated[list[ChatCompletionMessageParam], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # False by default (as in vLLM): chat templates write BOS themselves.
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatCompletionToolParam] | None = None


def _tokenize_form(value: Any) -> str:
    if isinstance(value, dict):
        return "messages" if "messages" in value else "prompt"
    return "messages" if isinstance(value, TokenizeChatRequest) else "prompt"


# POST /tokenize takes either {"prompt": ...} or {"messages": [...]}; the key present decides.
TokenizeRequest = Annotated[
    Union[
        Annotated[TokenizeCompletionRequest, Tag("prompt")],
        Annotated[TokenizeChatRequest, Tag("messages")],
    ],
    Discriminator(_tokenize_form),
]
tokenize_request_adapter: TypeAdapter[TokenizeCompletionRequest | TokenizeChatRequest] = TypeAdapter(TokenizeRequest)
