"""POST /v1/chat/completions, and `answer_chat`: the generation half of every route built on chat.

/v1/responses and /v1/messages turn their requests into a PreparedChat; from there all three run
the same steps here (token rate limit, grammar compile, engine request, accumulator, answer), and
differ only in the StreamWriter and body builder they hand over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from heron.server.accumulator import Accumulator
from heron.server.context import ServerContext, context_of, ignored_fields_headers, request_record
from heron.server.protocol import ChatCompletionRequest
from heron.server.registry import ServedModel
from heron.server.serving_chat import (
    ChatStreamWriter,
    PreparedChat,
    chat_accumulator,
    chat_body,
    chat_events,
    compile_chat,
    prepare_chat,
)
from heron.server.sse import StreamWriter, until_disconnect

router = APIRouter(tags=["OpenAI"])


async def answer_chat(
    request: Request,
    context: ServerContext,
    model: ServedModel,
    chat: PreparedChat,
    *,
    request_id: str,
    cache_salt: str | None,
    stream: bool,
    writer: Callable[[Accumulator], StreamWriter],
    body: Callable[[Accumulator], BaseModel],
    release: Callable[[], None],
    unknown: list[str],
) -> Response:
    """Run a prepared chat on `model` and send the answer: streamed through `writer`, or
    collected and built by `body` (both get the accumulator the events are folded into)."""
    record = request_record(request)
    num_prompt_tokens, n = len(chat.prompt_token_ids), chat.params.n
    context.rate_limit(request, num_prompt_tokens + chat.params.max_tokens * n)
    await until_disconnect(request, compile_chat(chat))
    record.finish_reasons, record.num_choices = chat.finish_reasons, n
    outputs = context.metrics.track(
        model.engine.generate(
            chat.prompt_token_ids,
            chat.params,
            request_id,
            cache_salt=context.cache_salt(request, cache_salt),
            grammar=chat.grammar,
        ),
        record, model.name, num_prompt_tokens, n,
    )
    accumulated = chat_accumulator(chat)
    return await context.answer(
        request,
        stream=stream,
        events=chat_events(chat, outputs),
        accumulator=accumulated,
        writer=lambda: writer(accumulated),
        body=lambda: body(accumulated),
        release=release,
        headers=ignored_fields_headers(unknown),
    )


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
        return await answer_chat(
            request, context, model, prepared,
            request_id=prepared.response_id,
            cache_salt=parsed.cache_salt,
            stream=bool(parsed.stream),
            writer=lambda accumulated: ChatStreamWriter(prepared, accumulated),
            body=lambda accumulated: chat_body(prepared, accumulated),
            release=release,
            unknown=unknown,
        )
