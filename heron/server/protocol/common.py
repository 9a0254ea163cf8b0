"""Shared pieces of the OpenAI wire protocol: model bases, usage, logprobs, errors, models, tokenize.

What flows in: JSON request bodies (dicts or bytes) validated by the request models here and in
`chat.py` / `completions.py`. What flows out: response models whose plain `model_dump()` /
`model_dump_json()` is exactly OpenAI's shape. This package imports nothing from the engine or torch.

Two bases carry the whole policy:

- `OpenAIRequestModel`: strict types (OpenAI rejects `"0.5"` for a number and `1` for a boolean, so do
  we), no NaN/inf, unknown fields kept (`extra="allow"`) and listed by `unknown_fields()` so the
  server can name them in a header or reject them under a strict option. Checks that involve more
  than one field raise a `PydanticCustomError` of type `invalid_request` whose `ctx["param"]` names
  the offending parameter, so the error mapper can fill OpenAI's `param` without parsing messages.
- `OpenAIResponseModel`: unknown fields forbidden (typos in our own code fail loudly) and a serializer
  that writes each `None` the way OpenAI's spec wants it: required-nullable fields (`finish_reason`
  in chunks, `content`, `refusal`, `logprobs`) are always present, optional-nullable ones appear as
  `null` only when the builder set them explicitly (`usage: null` on chunks when `include_usage` is
  on), and everything else is omitted when `None`. Do not pass `exclude_none=True` on top: it would
  strip the required nulls before this serializer sees them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------------------------------------
# Constrained scalar types (OpenAI's limits from openai-openapi.yaml unless noted)
# ---------------------------------------------------------------------------------------------

# The engine holds token ids, top_k, min_tokens and max_tokens as 32-bit integers; a value
# past that is refused here rather than overflowing a tensor in the middle of an engine step.
INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# The spec gives `seed` the int64 range; anything wider cannot reach a C-level RNG anyway.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# n is 1..128 in the spec for both endpoints.
NumChoices = Annotated[int, Field(ge=1, le=128)]
# logit_bias maps token ids written as decimal strings to an integer bias in [-100, 100]. The spec
# types the values as integers (vLLM takes any float); we take a whole-number float (5.0, which
# JavaScript clients and some SDKs write) as its integer and refuse a fraction.
LogitBiasKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]


def _whole_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


LogitBiasValue = Annotated[int, BeforeValidator(_whole_float_as_int), Field(ge=-100, le=100)]
# The sampler applies every entry of both at every step of the request, in the engine thread that
# serves everyone: their length is bounded (neither the spec nor vLLM bounds it).
MAX_TOKEN_ID_LIST = 4096
LogitBias = Annotated[dict[LogitBiasKey, LogitBiasValue], Field(max_length=MAX_TOKEN_ID_LIST)]


def _string_or_array_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return None


def string_or_array(array_type: Any) -> Any:
    """`str | array_type`, picked by the JSON type of the input.

    A plain union would report a bad array item twice (once as "not a string", once in the array);
    tagging by shape reports only the error in the branch the caller meant.
    """
    return Annotated[
        Union[Annotated[str, Tag("string")], Annotated[array_type, Tag("array")]],
        Discriminator(
            _string_or_array_tag,
            custom_error_type="string_or_array_type",
            custom_error_message="Input should be a string or an array",
        ),
    ]


# `stop`: one string or up to 4 strings (the spec's maxItems; vLLM allows any number). The spec's
# minItems of 1 is not enforced: clients (LangChain among them) send `[]` for "no stop", as vLLM
# and llama.cpp read it.
StopSequences = string_or_array(Annotated[list[str], Field(max_length=4)])
# Function and json_schema names: "a-z, A-Z, 0-9, underscores and dashes, max length 64" (spec
# descriptions; OpenAI enforces it, vLLM does not).
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]

# The largest magnitude we put on the wire for a log-probability. JSON has no -Infinity, and a
# token masked out by top-k/top-p/logit_bias has logprob -inf; OpenAI reports -9999.0 there.
MIN_LOGPROB = -9999.0


def _clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if value < MIN_LOGPROB else value


Logprob = Annotated[float, AfterValidator(_clamp_logprob)]


def invalid_request(param: str, message: str) -> PydanticCustomError:
    """A cross-field validation error that names the OpenAI parameter it is about.

    `message` must not contain braces: pydantic formats it as a template with the context.
    """
    return PydanticCustomError("invalid_request", message, {"param": param})


def now_unix() -> int:
    """Seconds since the epoch, as OpenAI's `created` fields carry."""
    return int(time.time())


# ---------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------


class OpenAIRequestModel(BaseModel):
    """Base of every request-side model (bodies and their nested objects)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def unknown_fields(self) -> list[str]:
        """Dotted paths of every field that no model declares, e.g. `["foo", "messages[1].bar"]`.

        Free-form objects (JSON schemas, tool parameters, `chat_template_kwargs`, `logit_bias`) are
        plain dicts, not models, so their keys are never reported.
        """
        found: list[str] = []
        _collect_unknown(self, "", found)
        return found


def _collect_unknown(value: Any, path: str, found: list[str]) -> None:
    if isinstance(value, BaseModel):
        prefix = f"{path}." if path else ""
        found.extend(prefix + key for key in (value.__pydantic_extra__ or {}))
        for name in type(value).model_fields:
            _collect_unknown(getattr(value, name), prefix + name, found)
    elif isinstance(value, list) and value and isinstance(value[0], (BaseModel, list)):
        # Lists are homogeneous here; checking the first item skips long token-id lists cheaply.
        for i, item in enumerate(value):
            _collect_unknown(item, f"{path}[{i}]", found)


class OpenAIResponseModel(BaseModel):
    """Base of every response-side model; see the module docstring for the `None` rules."""

    model_config = ConfigDict(extra="forbid")

    # Fields the spec marks required but nullable: written as `null` rather than dropped.
    _always_emit: ClassVar[frozenset[str]] = frozenset()
    # Optional-nullable fields: written as `null` only when the builder passed them explicitly.
    _null_when_set: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _openai_shape(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        keep = self._always_emit | (self._null_when_set & self.model_fields_set)
        return {key: value for key, value in data.items() if value is not None or key in keep}


# ---------------------------------------------------------------------------------------------
# Structured outputs: OpenAI's response_format and vLLM's structured_outputs
# ---------------------------------------------------------------------------------------------


class ResponseFormatText(OpenAIRequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(OpenAIRequestModel):
    type: Literal["json_object"]


class JSONSchema(OpenAIRequestModel):
    name: FunctionName
    description: str | None = None
    # Python name `schema_` because `schema` shadows a BaseModel method; the wire name is "schema".
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(OpenAIRequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[
    Union[ResponseFormatText, ResponseFormatJSONObject, ResponseFormatJSONSchema],
    Field(discriminator="type"),
]


class StructuredOutputsParam(OpenAIRequestModel):
    """vLLM's `structured_outputs`: exactly one constraint on the generated text."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    # A Lark grammar, or GBNF/EBNF as llama.cpp writes it.
    grammar: str | None = None
    json_object: bool | None = None


# ---------------------------------------------------------------------------------------------
# Request pieces shared by chat and completions
# ---------------------------------------------------------------------------------------------


class StreamOptions(OpenAIRequestModel):
    """`stream_options` (OpenAI's ChatCompletionStreamOptions, also used by /v1/completions)."""

    # Adds a final chunk with `usage` and empty `choices`; every other chunk carries `usage: null`.
    include_usage: bool | None = None
    # vLLM: with include_usage, every chunk carries the usage so far instead of null.
    continuous_usage_stats: bool | None = None


class GenerationRequest(OpenAIRequestModel):
    """Fields that /v1/chat/completions and /v1/completions share, OpenAI's and vLLM's.

    `None` on an optional OpenAI field means "not given": the services layer applies the model's
    own default (its generation config) and then OpenAI's.
    """

    # The spec requires `model` on both endpoints (vLLM makes it optional); we follow the spec.
    model: str
    frequency_penalty: Penalty | None = 0.0
    presence_penalty: Penalty | None = 0.0
    logit_bias: LogitBias | None = None
    n: NumChoices | None = 1
    seed: Seed | None = None
    stop: StopSequences | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None

    # --- vLLM extensions (same names and meaning as vLLM's OpenAI server) ---
    # -1 (or 0) means "no top-k", as in vLLM.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's prefix-cache salt: requests share cached prompt blocks only with the same salt (and,
    # with API keys configured, only within one key unless the server shares them).
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Constrained decoding (vLLM): `structured_outputs`, or its older spellings `guided_*`.
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    response_format: ResponseFormat | None = None
    # llama.cpp's server spellings of the same: a GBNF grammar, or a JSON schema, at top level.
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # vLLM: the log-probabilities of the prompt's tokens, with this many alternatives each (the
    # prompt's own token is always included); not with streaming, as in vLLM.
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # vLLM: the generated token ids on each choice and the prompt's token ids.
    return_token_ids: bool | None = None

    def requested_max_tokens(self) -> int | None:
        """The caller's cap on generated tokens, if any; each endpoint overrides where it lives."""
        return None

    @model_validator(mode="after")
    def _check_shared(self) -> GenerationRequest:
        # OpenAI answers 400 "The 'stream_options' parameter is only allowed when 'stream' is
        # enabled." (param stream_options). An explicit null is the same as leaving it out.
        if self.stream_options is not None and not self.stream:
            raise invalid_request(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        if self.prompt_logprobs is not None and self.stream:
            raise invalid_request("prompt_logprobs", "'prompt_logprobs' is not available when 'stream' is enabled.")
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise invalid_request(
                "min_tokens", "'min_tokens' must be less than or equal to the maximum number of tokens."
            )
        return self


# ---------------------------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------------------------


class PromptTokensDetails(OpenAIResponseModel):
    # Prompt tokens served from the prefix cache.
    cached_tokens: int = 0


class CompletionTokensDetails(OpenAIResponseModel):
    # Tokens a reasoning parser moved out of `content` (think blocks).
    reasoning_tokens: int = 0


class PromptLogprob(OpenAIResponseModel):
    """vLLM's entry for one candidate of one prompt token."""

    logprob: Logprob
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, token id (as a JSON key) -> its entry; the first
# token, which nothing predicted, is null.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionUsage(OpenAIResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


class TopLogprob(OpenAIResponseModel):
    token: str
    logprob: Logprob
    # UTF-8 bytes of the token; required by the spec, null when a token has no byte form.
    bytes: list[int] | None
    _always_emit = frozenset({"bytes"})


class ChatCompletionTokenLogprob(OpenAIResponseModel):
    token: str
    logprob: Logprob
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    _always_emit = frozenset({"bytes"})


class ChatCompletionLogprobs(OpenAIResponseModel):
    """`choices[].logprobs` of chat responses and chunks: both keys required, both nullable."""

    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None
    _always_emit = frozenset({"content", "refusal"})


class CompletionLogprobs(OpenAIResponseModel):
    """`choices[].logprobs` of the legacy completions endpoint: four parallel lists.

    The spec types `token_logprobs` items as numbers and `top_logprobs` items as objects, but the
    first prompt token under `echo` has no logprob and OpenAI (and vLLM) send `null` there; we allow
    it for that case.
    """

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ErrorDetail(OpenAIResponseModel):
    """OpenAI's `Error` object. `param` and `code` are required and nullable.

    The spec types `code` as a string (e.g. "model_not_found"); vLLM puts the HTTP status there as
    an integer. We follow the spec: the status travels as the HTTP status.
    """

    message: str
    # e.g. "invalid_request_error", "not_found_error", "internal_error".
    type: str
    param: str | None = None
    code: str | None = None
    _always_emit = frozenset({"param", "code"})


class ErrorResponse(OpenAIResponseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# Models (/v1/models)
# ---------------------------------------------------------------------------------------------


class ModelCard(OpenAIResponseModel):
    """OpenAI's `Model`, plus vLLM's `root` (where the weights came from) and `max_model_len`, and
    the sampling defaults a request that omits those fields gets (generation models only)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_unix)
    owned_by: str = "heron"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    sampling_defaults: dict[str, Any] | None = None
    sampling_defaults_source: str | None = None


class ModelList(OpenAIResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Tokenize / detokenize (vLLM's /tokenize and /detokenize; not part of OpenAI's API)
# ---------------------------------------------------------------------------------------------
# The chat form of the tokenize request needs the chat message types, so `TokenizeChatRequest`
# and the `TokenizeRequest` union live in chat.py.


class TokenizeCompletionRequest(OpenAIRequestModel):
    # Optional as in vLLM: a single-model server knows which tokenizer to use.
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResponse(OpenAIResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIResponseModel):
    prompt: str
