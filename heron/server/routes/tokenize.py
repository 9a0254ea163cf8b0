"""POST /tokenize and POST /detokenize (vLLM's shapes): the prompt a request would get, as token ids."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from heron.server.context import context_of, ignored_fields_headers
from heron.server.errors import bad_request
from heron.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    tokenize_request_adapter,
)
from heron.server.serving_chat import render_chat_prompt
from heron.server.serving_completions import encode_prompt_text
from heron.server.tool_calls import ToolPlan

router = APIRouter(tags=["Heron"])


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    context = context_of(request)
    parsed, unknown = await context.parse(request, tokenize_request_adapter)
    model = context.registry.get(parsed.model)

    def work() -> TokenizeResponse:
        if isinstance(parsed, TokenizeChatRequest):
            tools = None
            if parsed.tools:
                # The prompt a chat request with these tools (tool_choice "auto") would get.
                tools = ToolPlan.auto(
                    [tool.model_dump(exclude_none=True) for tool in parsed.tools], model.tool_call_parser
                )
            prompt = render_chat_prompt(
                model,
                parsed.messages,
                add_generation_prompt=parsed.add_generation_prompt and not parsed.continue_final_message,
                continue_final_message=parsed.continue_final_message,
                chat_template_kwargs=parsed.chat_template_kwargs,
                tools=tools,
            )
            tokens = model.tokenizer.encode_rendered(prompt, add_special_tokens=parsed.add_special_tokens)
        else:
            tokens = encode_prompt_text(model, parsed.prompt, parsed.add_special_tokens)
        # Only the prompt form has vLLM's `return_token_strs`.
        want_strs = isinstance(parsed, TokenizeCompletionRequest) and parsed.return_token_strs
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=model.max_model_len,
            tokens=tokens,
            token_strs=model.tokenizer.convert_ids_to_tokens(tokens) if want_strs else None,
        )

    # Rendering and tokenizing grow with the input: off the event loop.
    response = await asyncio.to_thread(work)
    return JSONResponse(response.model_dump(), headers=ignored_fields_headers(unknown))

@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    context = context_of(request)
    parsed, unknown = await context.parse(request, DetokenizeRequest)
    model = context.registry.get(parsed.model)
    for i, token_id in enumerate(parsed.tokens):
        if token_id >= model.vocab_size:
            raise bad_request(
                f"Invalid token id {token_id}: token ids must be below the vocabulary size {model.vocab_size}.",
                param=f"tokens[{i}]",
            )
    text = model.tokenizer.decode(parsed.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(), headers=ignored_fields_headers(unknown))
