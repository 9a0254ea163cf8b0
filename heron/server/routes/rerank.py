"""POST /v1/rerank (also /rerank and /v2/rerank) and POST /v1/score (also /score), as vLLM serves them.

Both answer for an encoder model: an embedding model (scores are the cosine similarity of the two
texts' embeddings) or a cross-encoder (each pair read as one sequence; its logit through the
model's activation). The scoring itself is heron.engine.embedding's (`tokenize_score`, `score`),
on the same micro-batching engine thread as /v1/embeddings; this module maps the two request
shapes onto it and its results back onto vLLM's response shapes.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, json_response, request_record
from heron.server.errors import bad_request
from heron.server.protocol.rerank import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
    ScoreUsage,
)
from heron.server.registry import ServedModel
from heron.server.serving_common import check_text_length, random_id
from heron.server.sse import request_error_from, until_disconnect

router = APIRouter(tags=["vLLM"])

_SCORING_KINDS = ("embed", "score")


def _scoring_model(context, name: str, endpoint: str) -> ServedModel:
    model = context.model(name)
    if model.kind not in _SCORING_KINDS:
        raise bad_request(
            f"The model `{name}` generates text: it does not serve {endpoint}. Ask an embedding model or a "
            "cross-encoder (reranker).",
            param="model",
            code="wrong_model_type",
        )
    return model


async def _scores(
    request: Request,
    model: ServedModel,
    text_1: list[str],
    text_2: list[str],
    *,
    truncate_prompt_tokens: int | None,
    use_activation: bool | None,
    params: tuple[str, str],
    singles: tuple[bool, bool],
) -> tuple[list[float], int]:
    """(one score per pair, prompt tokens run) for a validated request; input faults are 400s.
    `params` name the two fields, `singles` say which was sent as one string (not a list)."""
    context = context_of(request)
    if truncate_prompt_tokens is None:
        # A text longer than the context could hold, whatever its tokens, is refused before the
        # tokenizer spends seconds on it.
        for param, single, texts in zip(params, singles, (text_1, text_2)):
            for i, text in enumerate(texts):
                check_text_length(model, len(text), param if single else f"{param}[{i}]")
    context.rate_check(request)
    release = context.admission.acquire(1)
    try:
        try:
            inputs = await model.engine.tokenize_score(text_1, text_2, truncate_prompt_tokens, params)
            context.rate_limit(request, inputs.num_prompt_tokens)
            scores = await until_disconnect(request, model.engine.score(inputs, use_activation))
        except ValueError as exc:
            # EmbeddingInputError names the field at fault.
            message = str(exc)
            message = message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
            raise bad_request(message, param=getattr(exc, "param", None) or params[1]) from exc
        except Exception as exc:
            raise request_error_from(exc) from exc
    finally:
        release()
    return scores, inputs.num_prompt_tokens


async def _rerank(request: Request) -> Response:
    context = context_of(request)
    record = request_record(request)
    parsed, unknown = await context.parse(request, RerankRequest)
    record.model = parsed.model
    documents = parsed.document_texts()
    if context.settings.log_prompts:
        record.prompt = parsed.query
    model = _scoring_model(context, parsed.model, "/v1/rerank")
    scores, prompt_tokens = await _scores(
        request,
        model,
        [parsed.query],
        documents,
        truncate_prompt_tokens=parsed.truncate_prompt_tokens,
        use_activation=parsed.activation_asked(),
        params=("query", "documents"),
        singles=(True, False),
    )
    # Best first; equal scores keep the documents' order (a stable sort, as vLLM's).
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if parsed.top_n:  # 0 or absent: every document, as vLLM reads it
        order = order[: parsed.top_n]
    results = [
        RerankResult(
            index=i,
            document=RerankDocument(text=documents[i]) if parsed.return_documents else None,
            relevance_score=scores[i],
        )
        for i in order
    ]
    response = RerankResponse(
        id=random_id("rerank-"),
        model=parsed.model,
        usage=RerankUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        results=results,
    )
    record.num_prompt_tokens, record.extra["inputs"] = prompt_tokens, len(documents)
    return json_response(response, ignored_fields_headers(unknown))


async def _score(request: Request) -> Response:
    context = context_of(request)
    record = request_record(request)
    parsed, unknown = await context.parse(request, ScoreRequest)
    record.model = parsed.model
    text_1, text_2 = parsed.texts()
    if context.settings.log_prompts:
        record.prompt = text_1
    model = _scoring_model(context, parsed.model, "/v1/score")
    scores, prompt_tokens = await _scores(
        request,
        model,
        text_1,
        text_2,
        truncate_prompt_tokens=parsed.truncate_prompt_tokens,
        use_activation=parsed.activation_asked(),
        params=("text_1", "text_2"),
        singles=(isinstance(parsed.text_1, str), isinstance(parsed.text_2, str)),
    )
    response = ScoreResponse(
        id=random_id("score-"),
        model=parsed.model,
        data=[ScoreResponseData(index=i, score=score) for i, score in enumerate(scores)],
        usage=ScoreUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )
    record.num_prompt_tokens, record.extra["inputs"] = prompt_tokens, len(scores)
    return json_response(response, ignored_fields_headers(unknown))


# vLLM serves each under several paths (Jina's /v1/rerank, Cohere's /v2/rerank, its own bare ones).
for _path in ("/v1/rerank", "/rerank", "/v2/rerank"):
    router.add_api_route(_path, _rerank, methods=["POST"], name=f"rerank{_path.replace('/', '_')}")
for _path in ("/v1/score", "/score"):
    router.add_api_route(_path, _score, methods=["POST"], name=f"score{_path.replace('/', '_')}")
