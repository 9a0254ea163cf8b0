"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

Requests are parsed and authorized like every other route (an `x-api-key` header works as well as
`Authorization: Bearer`); errors on these paths come in Anthropic's envelope (heron/server/app.py).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, json_response, request_record
from heron.server.protocol.messages import CountTokensRequest, MessagesRequest, MessageTokensCount
from heron.server.routes.chat import answer_chat
from heron.server.serving_messages import MessagesStreamWriter, count_input_tokens, message_body, prepare_message

router = APIRouter(tags=["Anthropic"])


@router.post("/v1/messages")
async def create_message(request: Request) -> Response:
    context = context_of(request)
    settings = context.settings
    record = request_record(request)
    parsed, unknown = await context.parse(request, MessagesRequest)
    record.model, record.stream = parsed.model, bool(parsed.stream)
    if settings.log_prompts:
        record.prompt = [message.model_dump(exclude_none=True) for message in parsed.messages]
    model = context.model(parsed.model, "generate")
    context.rate_check(request)
    with context.admitted(1) as release:
        prepared = await asyncio.to_thread(prepare_message, parsed, model, settings.seed)
        return await answer_chat(
            request, context, model, prepared.chat,
            request_id=prepared.message_id,
            cache_salt=None,
            stream=bool(parsed.stream),
            writer=lambda accumulated: MessagesStreamWriter(prepared, accumulated),
            body=lambda accumulated: message_body(prepared, accumulated),
            release=release,
            unknown=unknown,
        )


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    context = context_of(request)
    parsed, unknown = await context.parse(request, CountTokensRequest)
    model = context.model(parsed.model, "generate")
    tokens = await asyncio.to_thread(count_input_tokens, parsed, model)
    return json_response(MessageTokensCount(input_tokens=tokens), ignored_fields_headers(unknown))
