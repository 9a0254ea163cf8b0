"""/v1/embeddings on the wire: OpenAI's CreateEmbeddingRequest and CreateEmbeddingResponse.

`input` is a string, a list of strings, one list of token ids, or a list of token-id lists (the
spec's four forms, with its limits: at most 2048 items, no empty string or empty list).
`encoding_format` is `float` (JSON numbers) or `base64` (little-endian float32 bytes). vLLM's
`truncate_prompt_tokens` extension is accepted. Imports nothing from the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from heron.server.protocol.common import OpenAIRequestModel, OpenAIResponseModel, TokenId, invalid_request
from heron.server.protocol.completions import prompt_form

MAX_INPUTS = 2048


EmbeddingInput = Annotated[
    Union[
        Annotated[str, Tag("text")],
        Annotated[Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)], Tag("texts")],
        Annotated[Annotated[list[TokenId], Field(min_length=1)], Tag("tokens")],
        Annotated[
            Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)],
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


class EmbeddingRequest(OpenAIRequestModel):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    # vLLM extension: -1 truncates to the model's maximum, k keeps the last k tokens.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingRequest:
        texts = [self.input] if isinstance(self.input, str) else self.input
        for i, item in enumerate(texts):
            if isinstance(item, str) and not item:
                where = "input" if isinstance(self.input, str) else f"input[{i}]"
                # OpenAI refuses empty strings: there is nothing to embed.
                raise invalid_request(where, f"'{where}' must not be an empty string.")
        if self.truncate_prompt_tokens == 0:
            raise invalid_request("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 or positive.")
        return self

    def inputs(self) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) or (None, token-id lists)."""
        if isinstance(self.input, str):
            return [self.input], None
        if isinstance(self.input[0], str):
            return list(self.input), None
        if isinstance(self.input[0], int):
            return None, [list(self.input)]
        return None, [list(ids) for ids in self.input]


class Embedding(OpenAIResponseModel):
    object: Literal["embedding"] = "embedding"
    # A list of floats, or for encoding_format=base64 the little-endian float32 bytes in base64.
    embedding: list[float] | str
    index: int


class EmbeddingUsage(OpenAIResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
