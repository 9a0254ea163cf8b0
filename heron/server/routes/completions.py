"""POST /v1/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from heron.server.context import context_of, ignored_fields_headers, request_record
from heron.server.errors import bad_request
from heron.server.protocol import CompletionRequest
from heron.server.serving_common import merge_streams
from heron.server.serving_completions import (
    CompletionStreamWriter,
    compile_completion,
    completion_accumulator,
    completion_body,
    completion_events,
    num_completion_prompts,
    prepare_completion,
)
from heron.server.sse import until_disconnect

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    context = context_of(request)
    settings = context.settings
    record = request_record(request)
    parsed, unknown = await context.parse(request, CompletionRequest)
    record.model, record.stream = parsed.model, bool(parsed.stream)
    if settings.log_prompts:
        record.prompt = parsed.prompt
    model = context.model(parsed.model, "generate")
    num_prompts = num_completion_prompts(parsed)
    if num_prompts > settings.max_prompts_per_request:
        raise bad_request(
            f"This request has {num_prompts} prompts; this server takes at most "
            f"{settings.max_prompts_per_request} per request (--max-prompts-per-request).",
            param="prompt",
            code="too_many_prompts",
        )
    context.rate_check(request)
    with context.admitted(num_prompts * (parsed.best_of or parsed.n or 1)) as release:
        prepared = await asyncio.to_thread(prepare_completion, parsed, model, settings.seed)
        total_prompt_tokens = sum(len(p.token_ids) for p in prepared.prompts)
        if total_prompt_tokens > settings.max_prompt_tokens_per_request:
            raise bad_request(
                f"This request's prompts have {total_prompt_tokens} tokens in all; this server takes at most "
                f"{settings.max_prompt_tokens_per_request} per request (--max-prompt-tokens-per-request).",
                param="prompt",
                code="too_many_prompt_tokens",
            )
        context.rate_limit(
            request,
            sum(len(p.token_ids) + prepared.params.max_tokens * prepared.params.n for p in prepared.prompts),
        )
        await until_disconnect(request, compile_completion(prepared))
        record.finish_reasons, record.num_choices = prepared.finish_reasons, len(prepared.prompts) * prepared.n
        salt = context.cache_salt(request, parsed.cache_salt)
        streams = [
            context.metrics.track(
                model.engine.generate(
                    prompt.token_ids,
                    prepared.params,
                    f"{prepared.response_id}-{i}",
                    cache_salt=salt,
                    grammar=prepared.grammar,
                ),
                record, model.name, len(prompt.token_ids), prepared.params.n,
            )
            for i, prompt in enumerate(prepared.prompts)
        ]
        accumulated = completion_accumulator(prepared)
        return await context.answer(
            request,
            stream=bool(parsed.stream),
            events=completion_events(prepared, merge_streams(streams)),
            accumulator=accumulated,
            writer=lambda: CompletionStreamWriter(prepared, accumulated),
            body=lambda: completion_body(prepared, accumulated),
            release=release,
            headers=ignored_fields_headers(unknown),
        )
