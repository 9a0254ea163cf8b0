"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, and its input items.

Stored responses (`store`, true by default as in OpenAI) live in the server's ResponseStore
(heron/server/responses_store.py: memory, or SQLite with --responses-store), so that
`previous_response_id` continues a conversation and GET reads a response back.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from heron.server.context import ServerContext, context_of, request_record
from heron.server.errors import APIError, bad_request
from heron.server.protocol.responses import ResponseCreateRequest, ResponseDeleted, ResponseObject
from heron.server.responses_store import ResponseTooLargeError
from heron.server.accumulator import Accumulator
from heron.server.routes.chat import answer_chat
from heron.server.serving_responses import (
    PreparedResponse,
    ResponsesStreamWriter,
    conversation_after,
    prepare_response,
    response_body,
)

router = APIRouter(tags=["OpenAI"])


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _store(context: ServerContext, prepared: PreparedResponse, response: ResponseObject) -> None:
    if not prepared.request.store:
        return
    try:
        context.responses.put(response.model_dump(), prepared.input_items, conversation_after(prepared, response))
    except ResponseTooLargeError as exc:
        # The answer stands; only continuing from it will not work.
        response.store = False
        context.logger.warning("response %s not stored: %s", response.id, exc)


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    context = context_of(request)
    settings = context.settings
    record = request_record(request)
    parsed, unknown = await context.parse(request, ResponseCreateRequest)
    record.model, record.stream = parsed.model, bool(parsed.stream)
    if settings.log_prompts:
        given = parsed.input
        record.prompt = given if isinstance(given, str) or given is None else [item.model_dump(exclude_none=True) for item in given]
    model = context.model(parsed.model, "generate")
    history: list[dict[str, Any]] = []
    if parsed.previous_response_id is not None:
        stored = await asyncio.to_thread(context.responses.get, parsed.previous_response_id)
        if stored is None:
            raise bad_request(
                f"Previous response with id '{parsed.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = stored.conversation
    context.rate_check(request)
    with context.admitted(1) as release:
        prepared = await asyncio.to_thread(prepare_response, parsed, model, settings.seed, history)

        def body(accumulated: Accumulator) -> ResponseObject:
            response = response_body(prepared, accumulated)
            _store(context, prepared, response)
            return response

        return await answer_chat(
            request, context, model, prepared.chat,
            request_id=prepared.response_id,
            cache_salt=parsed.cache_salt,
            stream=bool(parsed.stream),
            writer=lambda accumulated: ResponsesStreamWriter(
                prepared, accumulated, lambda response: _store(context, prepared, response)
            ),
            body=body,
            release=release,
            unknown=unknown,
        )


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    context = context_of(request)
    context.authorize(request)
    stored = await asyncio.to_thread(context.responses.get, response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    context = context_of(request)
    context.authorize(request)
    if not await asyncio.to_thread(context.responses.delete, response_id):
        raise _not_found(response_id)
    return JSONResponse(ResponseDeleted(id=response_id).model_dump())


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    limit: int = Query(20),
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    context = context_of(request)
    context.authorize(request)
    if not 1 <= limit <= 100:
        raise bad_request(f"Invalid 'limit': {limit}. It must be between 1 and 100.", param="limit")
    page = await asyncio.to_thread(context.responses.list_input_items, response_id, after, limit, order)
    if page is None:
        raise _not_found(response_id)
    return JSONResponse(page)
