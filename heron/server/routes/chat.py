"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, request_record
from heron.server.protocol import ChatCompletionRequest
from heron.server.serving_chat import ChatStreamWriter, chat_accumulator, chat_body, chat_events, compile_chat, prepare_chat
from heron.server.sse import until_disconnect

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    context = context_of(request)
    settings = context.settings
    record = request_record(request)
    parsed, unknown = await context.parse(request, ChatCompletionRequest)
    record.model, record.stream = parsed.model, bool(parsed.stream)
    if settings.log_prompts:
        record.prompt = [m.model_dump(exclude_none=True) for m in parsed.messages]
    model = context.model(parsed.model, "generate")
    # Cheap refusals first: nothing is rendered, tokenized or compiled for a request refused.
    context.rate_check(request)
    with context.admitted(parsed.n or 1) as release:
        # Rendering the template and tokenizing grow with the messages: off the event loop.
        prepared = await asyncio.to_thread(prepare_chat, parsed, model, settings.seed)
        context.rate_limit(request, len(prepared.prompt_token_ids) + prepared.params.max_tokens * prepared.params.n)
        await until_disconnect(request, compile_chat(prepared))
        record.finish_reasons, record.num_choices = prepared.finish_reasons, prepared.params.n
        outputs = context.metrics.track(
            model.engine.generate(
                prepared.prompt_token_ids,
                prepared.params,
                prepared.response_id,
                cache_salt=context.cache_salt(request, parsed.cache_salt),
                grammar=prepared.grammar,
            ),
            record, model.name, len(prepared.prompt_token_ids), prepared.params.n,
        )
        accumulated = chat_accumulator(prepared)
        return await context.answer(
            request,
            stream=bool(parsed.stream),
            events=chat_events(prepared, outputs),
            accumulator=accumulated,
            writer=lambda: ChatStreamWriter(prepared, accumulated),
            body=lambda: chat_body(prepared, accumulated),
            release=release,
            headers=ignored_fields_headers(unknown),
        )
