"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

Requests are parsed and authorized like every other route (an `x-api-key` header works as well as
`Authorization: Bearer`); errors on these paths come in Anthropic's envelope (heron/server/app.py).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, json_response, request_record
from heron.server.protocol.messages import CountTokensRequest, MessageObject, MessagesRequest, MessageTokensCount
from heron.server.serving_chat import chat_accumulator, chat_events, compile_chat
from heron.server.serving_messages import MessagesStreamWriter, count_input_tokens, message_body, prepare_message
from heron.server.sse import until_disconnect

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
        chat = prepared.chat
        context.rate_limit(request, len(chat.prompt_token_ids) + chat.params.max_tokens)
        await until_disconnect(request, compile_chat(chat))
        record.finish_reasons, record.num_choices = chat.finish_reasons, 1
        outputs = context.metrics.track(
            model.engine.generate(
                chat.prompt_token_ids,
                chat.params,
                prepared.message_id,
                cache_salt=context.cache_salt(request, None),
                grammar=chat.grammar,
            ),
            record, model.name, len(chat.prompt_token_ids), 1,
        )
        accumulated = chat_accumulator(chat)

        def body() -> MessageObject:
            return message_body(prepared, accumulated)

        return await context.answer(
            request,
            stream=bool(parsed.stream),
            events=chat_events(chat, outputs),
            accumulator=accumulated,
            writer=lambda: MessagesStreamWriter(prepared, accumulated),
            body=body,
            release=release,
            headers=ignored_fields_headers(unknown),
        )


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    context = context_of(request)
    parsed, unknown = await context.parse(request, CountTokensRequest)
    model = context.model(parsed.model, "generate")
    tokens = await asyncio.to_thread(count_input_tokens, parsed, model)
    return json_response(MessageTokensCount(input_tokens=tokens), ignored_fields_headers(unknown))
