"""/v1/rerank and /v1/score on the wire: vLLM's RerankRequest / ScoreRequest and their responses.

Rerank is the Jina / Cohere shape vLLM and llama.cpp serve: `query`, `documents` (strings, or
objects with `text` as Cohere v2 and Jina allow), `top_n` (0 or absent: all, vLLM's default) and
`return_documents` (Jina's flag, default true: vLLM always returns the documents). Its response
is `{"id", "model", "usage": {"prompt_tokens", "total_tokens"}, "results": [{"index", "document":
{"text"}, "relevance_score"}]}`, best first.

Score is vLLM's sentence-transformers-style pair scoring: `text_1` and `text_2`, each a string or
a list, paired 1:1, 1:N (one text_1 against every text_2) or N:N (text_1[i] with text_2[i]); its
response is a list of `{"index", "object": "score", "score"}` in pair order.

Both take vLLM's `truncate_prompt_tokens` (-1: the model's maximum; k: at most k tokens) and
`use_activation` (false: a cross-encoder's raw logit; its older names `activation` and `softmax`
are read too). Imports nothing from the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from heron.server.protocol.common import OpenAIRequestModel, OpenAIResponseModel, invalid_request, now_unix, string_or_array

# As many texts as /v1/embeddings takes in one request.
MAX_TEXTS = 2048


class RerankDocumentParam(OpenAIRequestModel):
    """A document given as an object (Cohere v2, Jina): only its text is read."""

    text: str


def _document_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return None


RerankDocumentInput = Annotated[
    Union[Annotated[str, Tag("string")], Annotated[RerankDocumentParam, Tag("object")]],
    Discriminator(
        _document_form,
        custom_error_type="document_type",
        custom_error_message="Input should be a string or an object with a 'text' string",
    ),
]

TruncatePromptTokens = Annotated[int, Field(ge=-1)]


class _ScoringRequest(OpenAIRequestModel):
    """What rerank and score share: the model and vLLM's pooling knobs."""

    model: str
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    use_activation: bool | None = None
    # vLLM's earlier names for use_activation, still read by it (deprecated there).
    activation: bool | None = None
    softmax: bool | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_truncation(self):
        if self.truncate_prompt_tokens == 0:
            raise invalid_request("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 or positive.")
        return self

    def activation_asked(self) -> bool | None:
        """use_activation, or the older name the caller used; None: the model's default."""
        for value in (self.use_activation, self.activation, self.softmax):
            if value is not None:
                return value
        return None


class RerankRequest(_ScoringRequest):
    query: str
    documents: Annotated[list[RerankDocumentInput], Field(min_length=1, max_length=MAX_TEXTS)]
    top_n: Annotated[int, Field(ge=0)] | None = None
    return_documents: bool = True

    @model_validator(mode="after")
    def _check_query(self) -> RerankRequest:
        if not self.query:
            raise invalid_request("query", "'query' must not be an empty string.")
        return self

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


ScoreTexts = string_or_array(Annotated[list[str], Field(min_length=1, max_length=MAX_TEXTS)])


class ScoreRequest(_ScoringRequest):
    text_1: ScoreTexts
    text_2: ScoreTexts

    @model_validator(mode="after")
    def _check_pairing(self) -> ScoreRequest:
        texts_1, texts_2 = self.texts()
        for i, text in enumerate(texts_1):
            if not text:
                where = "text_1" if isinstance(self.text_1, str) else f"text_1[{i}]"
                raise invalid_request(where, f"'{where}' must not be an empty string.")
        if len(texts_1) > 1 and len(texts_1) != len(texts_2):
            # vLLM's rule: 1:1, 1:N or N:N (so N:1 is not a pairing either).
            raise invalid_request(
                "text_2",
                f"'text_1' has {len(texts_1)} texts and 'text_2' has {len(texts_2)}: give one text_1 to score "
                "against every text_2 (1:N), or as many of each (N:N).",
            )
        return self

    def texts(self) -> tuple[list[str], list[str]]:
        def as_list(value: str | list[str]) -> list[str]:
            return [value] if isinstance(value, str) else list(value)

        return as_list(self.text_1), as_list(self.text_2)


# --------------------------------------------------------------------------------------------- responses


class RerankDocument(OpenAIResponseModel):
    text: str


class RerankResult(OpenAIResponseModel):
    index: int
    document: RerankDocument | None = None  # left out with return_documents: false
    relevance_score: float


class RerankUsage(OpenAIResponseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIResponseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ScoreResponseData(OpenAIResponseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(OpenAIResponseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(OpenAIResponseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now_unix)
    model: str
    data: list[ScoreResponseData]
    usage: ScoreUsage
