"""POST /v1/chat/completions: a validated ChatCompletionRequest in, OpenAI's response or chunks out.

`prepare_chat()` does everything that can fail before a byte is sent (features Heron cannot honour,
chat template rendering, tokenization, the context-length check, sampling params), so a streamed
request that is going to fail fails with a proper status code. `chat_response()` collects one
complete response; `chat_stream()` yields SSE frames in OpenAI's order: a role delta per choice,
content deltas, one finish chunk per choice, the usage chunk when asked for, then `[DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from heron.models.chat_template import ChatTemplateError
from heron.outputs import FinishReason, RequestOutput
from heron.sampling_params import SamplingParams
from heron.server.errors import APIError, bad_request
from heron.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionLogprobs,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChoiceDelta,
)
from heron.server.registry import ServedModel
from heron.server.serving_common import (
    SSE_DONE,
    TokenText,
    chat_logprobs,
    check_context,
    chunk_writer,
    random_id,
    request_error_from,
    sampling_params,
    shown_logprobs,
    sse_error,
    usage,
)

_TEXT_PART_TYPES = {"text", "refusal"}


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    model: ServedModel
    response_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs


def _reject_unsupported(request: ChatCompletionRequest) -> None:
    """400 for what would change the output if Heron silently ignored it."""
    # OpenAI fields Heron does not declare land in the extras (ignored, named in a header); these
    # few would change what comes back, so they are refused instead.
    extra = request.__pydantic_extra__ or {}
    modalities = extra.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise bad_request("This model produces text only; 'modalities' other than 'text' are not supported.", param="modalities")
    if extra.get("audio") is not None:
        raise bad_request("Audio output is not supported by this model.", param="audio")
    if extra.get("web_search_options") is not None:
        raise bad_request("Web search is not available on this server.", param="web_search_options")
    if request.tools and request.tool_choice != "none":
        raise bad_request(
            "Tool calling is not supported by this server yet; send the request without 'tools' "
            "(or with tool_choice 'none').",
            param="tools",
        )
    if request.functions and request.function_call != "none":
        raise bad_request(
            "Function calling is not supported by this server yet; send the request without 'functions'.",
            param="functions",
        )
    if request.response_format is not None and request.response_format.type != "text":
        raise bad_request(
            f"response_format of type '{request.response_format.type}' is not supported by this server yet.",
            param="response_format",
        )
    for i, message in enumerate(request.messages):
        content = getattr(message, "content", None)
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type not in _TEXT_PART_TYPES:
                    kind = {"image_url": "image", "input_audio": "audio", "file": "file"}.get(part.type, part.type)
                    raise bad_request(
                        f"This model does not accept {kind} input; only text content parts are supported.",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_content",
                    )


def render_chat_prompt(
    model: ServedModel,
    messages: list,
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict | None,
) -> str:
    if model.chat_template is None:
        raise bad_request(
            "This model has no chat template, so it cannot serve chat requests; use /v1/completions or start "
            "the server with --chat-template.",
            param="messages",
        )
    conversation = [m.model_dump(by_alias=True, exclude_none=True) for m in messages]
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt", "continue_final_message", "tools", "documents"):
        if reserved in kwargs:
            raise bad_request(f"'chat_template_kwargs' must not set '{reserved}'.", param="chat_template_kwargs")
    try:
        return model.chat_template.render(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except ChatTemplateError as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc


def prepare_chat(request: ChatCompletionRequest, model: ServedModel, default_seed: int | None) -> PreparedChat:
    _reject_unsupported(request)
    prompt = render_chat_prompt(
        model,
        request.messages,
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        chat_template_kwargs=request.chat_template_kwargs,
    )
    # The template writes any BOS it wants itself.
    prompt_ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    max_tokens = check_context(model, len(prompt_ids), request.requested_max_tokens(), "messages")
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(
        request, model, max_tokens=max_tokens, n=request.n or 1, logprobs=top_logprobs, default_seed=default_seed
    )
    return PreparedChat(request, model, random_id("chatcmpl-"), prompt_ids, params, top_logprobs)


def _finish_reason(reason: FinishReason) -> str:
    if reason == FinishReason.ABORT:
        raise APIError(503, "The request was cancelled because the server is shutting down.", code="request_cancelled")
    return reason.value


def _usage(prepared: PreparedChat, final: RequestOutput):
    return usage(len(prepared.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs), final.num_cached_tokens)


async def chat_response(prepared: PreparedChat, outputs: AsyncIterator[RequestOutput]) -> ChatCompletionResponse:
    final = None
    async for output in outputs:
        final = output
    assert final is not None and final.finished
    text = TokenText(prepared.model.tokenizer)
    choices = []
    for completion in final.outputs:
        logprobs = None
        if prepared.top_logprobs is not None:
            logprobs = ChatCompletionLogprobs(
                content=chat_logprobs(
                    shown_logprobs(completion.logprobs, completion, prepared.params), text, prepared.top_logprobs
                ),
                refusal=None,
            )
        choices.append(
            ChatCompletionResponseChoice(
                index=completion.index,
                message=ChatCompletionMessage(content=completion.text),
                logprobs=logprobs,
                finish_reason=_finish_reason(completion.finish_reason),
                stop_reason=completion.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=prepared.response_id,
        model=prepared.request.model,
        system_fingerprint=prepared.model.system_fingerprint,
        choices=choices,
        usage=_usage(prepared, final),
    )


async def chat_stream(prepared: PreparedChat, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
    request = prepared.request
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    chunk = chunk_writer(ChatCompletionChunk, prepared, include_usage)
    text = TokenText(prepared.model.tokenizer)
    n = prepared.params.n

    finished: set[int] = set()
    final: RequestOutput | None = None
    try:
        for index in range(n):
            yield chunk(
                [ChatCompletionResponseStreamChoice(index=index, delta=ChoiceDelta(role="assistant", content="", refusal=None))]
            )
        async for output in outputs:
            final = output
            for completion in output.outputs:
                index = completion.index
                if index in finished:
                    continue
                logprobs = None
                shown = shown_logprobs(completion.delta_logprobs, completion, prepared.params)
                if prepared.top_logprobs is not None and shown:
                    logprobs = ChatCompletionLogprobs(
                        content=chat_logprobs(shown, text, prepared.top_logprobs), refusal=None
                    )
                if completion.delta_text or logprobs is not None:
                    yield chunk(
                        [
                            ChatCompletionResponseStreamChoice(
                                index=index, delta=ChoiceDelta(content=completion.delta_text), logprobs=logprobs
                            )
                        ]
                    )
                if completion.finish_reason is not None:
                    finished.add(index)
                    yield chunk(
                        [
                            ChatCompletionResponseStreamChoice(
                                index=index,
                                delta=ChoiceDelta(),
                                finish_reason=_finish_reason(completion.finish_reason),
                                stop_reason=completion.stop_reason,
                            )
                        ]
                    )
        if include_usage and final is not None:
            yield chunk([], usage=_usage(prepared, final))
    except Exception as exc:  # after the first byte the status is sent: report in the stream
        yield sse_error(request_error_from(exc))
    finally:
        # Leaving early (client gone) must abort the engine request now, not when collected.
        await outputs.aclose()
    yield SSE_DONE
