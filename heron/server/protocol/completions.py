"""/v1/completions on the wire: the legacy text-completion request, response and stream chunks.

In: a JSON body validated into `CompletionRequest` (OpenAI's CreateCompletionRequest plus vLLM's
sampling extensions). Out: `CompletionResponse` (object "text_completion"), or a stream of
`CompletionChunk`. OpenAI streams completions with the very same object ("text_completion"); the
chunk model differs from the response only in that `finish_reason` is null until a choice ends and
that `usage` may be an explicit null (see `CompletionChunk`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from heron.server.protocol.common import (
    CompletionLogprobs,
    CompletionUsage,
    INT32_MAX,
    GenerationRequest,
    OpenAIResponseModel,
    PromptLogprobs,
    TokenId,
    invalid_request,
    now_unix,
)

# A prompt is a string, a batch of strings, one token-id list, or a batch of token-id lists. The
# spec bounds the token forms to at least one item; we also refuse an empty batch of strings
# (nothing to complete), which the spec leaves open. The spec also lets `prompt` be null, meaning
# "<|endoftext|>", a GPT-tokenizer artefact with no meaning for other vocabularies: we require it.


def prompt_form(value: Any) -> str | None:
    """Which of the four prompt forms `value` is: tagging by shape reports a bad item once, in the
    form the caller meant. /v1/embeddings' `input` takes the same four forms."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    if not value or isinstance(value[0], str):
        return "texts"
    return "token_lists" if isinstance(value[0], list) else "tokens"


Prompt = Annotated[
    Union[
        Annotated[str, Tag("text")],
        Annotated[Annotated[list[str], Field(min_length=1)], Tag("texts")],
        Annotated[Annotated[list[TokenId], Field(min_length=1)], Tag("tokens")],
        Annotated[
            Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
            Tag("token_lists"),
        ],
    ],
    Discriminator(
        prompt_form,
        custom_error_type="prompt_type",
        custom_error_message=(
            "Input should be a string, an array of strings, an array of tokens or an array of token arrays"
        ),
    ),
]


class CompletionRequest(GenerationRequest):
    """Body of POST /v1/completions."""

    prompt: Prompt
    # Spec range is 0..20 (0 is meaningless but allowed); it must also be >= n, checked below.
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    # Unlike chat, an integer: how many alternatives to return per position, 0..5 in the spec
    # (vLLM allows more; we follow the spec). 0 still returns the chosen token's logprob.
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    # The spec's default is 16 and 0 is allowed: with `echo` it scores a prompt without generating.
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = 16
    suffix: str | None = None
    # vLLM: keep only this many prompt tokens (-1: the model's context length), cut from the
    # left (the start, vLLM's default) or the right.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    truncation_side: Literal["left", "right"] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        n = self.n if self.n is not None else 1
        if self.best_of is not None:
            # Spec: "`best_of` must be greater than `n`"; equal is the no-op default (1 and 1).
            if self.best_of < n:
                raise invalid_request("best_of", "'best_of' must be greater than or equal to 'n'.")
            # Spec: best_of "results cannot be streamed": picking the best needs all candidates.
            if self.stream and self.best_of > n:
                raise invalid_request("best_of", "'best_of' greater than 'n' cannot be used with 'stream'.")
        return self


CompletionFinishReason = Literal["stop", "length", "content_filter"]


class CompletionResponseChoice(OpenAIResponseModel):
    text: str
    index: int
    # Required and nullable: null unless the request asked for logprobs.
    logprobs: CompletionLogprobs | None = None
    finish_reason: CompletionFinishReason
    # vLLM extension: the stop string or token id that ended the choice, when one did.
    stop_reason: int | str | None = None
    # vLLM extensions: prompt_logprobs, and (return_token_ids) the generated and prompt token ids.
    prompt_logprobs: PromptLogprobs | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None

    _always_emit: ClassVar[frozenset[str]] = frozenset({"logprobs"})


class CompletionResponse(OpenAIResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_unix)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: CompletionUsage | None = None


class CompletionResponseStreamChoice(OpenAIResponseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    # Null on every chunk but the last of the choice. The spec's CreateCompletionResponse, which
    # OpenAI reuses for stream events, does not mark it nullable; the live API sends null anyway.
    finish_reason: CompletionFinishReason | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: what this chunk added
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the choice's first chunk

    _always_emit: ClassVar[frozenset[str]] = frozenset({"logprobs", "finish_reason"})


class CompletionChunk(OpenAIResponseModel):
    """One server-sent event of a streamed completion (object "text_completion", as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_unix)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseStreamChoice]
    # stream_options.include_usage documents `usage: null` on every chunk but the final usage
    # chunk, while CreateCompletionResponse types `usage` as non-nullable: the spec contradicts
    # itself. We follow the stream_options contract, so null appears only when set explicitly.
    usage: CompletionUsage | None = None

    _null_when_set: ClassVar[frozenset[str]] = frozenset({"usage"})
