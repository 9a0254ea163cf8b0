"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, json_response, request_record
from heron.server.errors import bad_request
from heron.server.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from heron.server.sse import request_error_from, until_disconnect

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings")
async def create_embedding(request: Request) -> Response:
    context = context_of(request)
    record = request_record(request)
    parsed, unknown = await context.parse(request, EmbeddingRequest)
    record.model = parsed.model
    if context.settings.log_prompts:
        record.prompt = parsed.input
    model = context.model(parsed.model, "embed")
    # The engine validates ids, lengths and dimensions (EmbeddingInputError -> 400 below).
    texts, token_ids = parsed.inputs()
    context.rate_check(request)
    release = context.admission.acquire(1)
    try:
        try:
            if texts is not None:
                token_ids = await model.engine.tokenize(texts, parsed.truncate_prompt_tokens)
            context.rate_limit(request, sum(len(ids) for ids in token_ids))
            outputs = await until_disconnect(
                request,
                model.engine.embed(token_ids, parsed.truncate_prompt_tokens, parsed.dimensions, request.state.request_id),
            )
        except ValueError as exc:
            # EmbeddingInputError names the field at fault; other ValueErrors concern the input.
            message = str(exc)
            message = message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
            raise bad_request(message, param=getattr(exc, "param", None) or "input") from exc
        except Exception as exc:
            raise request_error_from(exc) from exc
    finally:
        release()
    data = []
    for index, output in enumerate(outputs):
        if parsed.encoding_format == "base64":
            vector: list[float] | str = base64.b64encode(np.asarray(output.embedding, dtype="<f4").tobytes()).decode("ascii")
        else:
            vector = output.embedding
        data.append(Embedding.model_construct(embedding=vector, index=index))
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
    response = EmbeddingResponse(
        data=data, model=parsed.model, usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    )
    record.num_prompt_tokens, record.extra["inputs"] = prompt_tokens, len(outputs)
    return json_response(response, ignored_fields_headers(unknown))
