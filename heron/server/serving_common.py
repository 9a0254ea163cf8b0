"""What chat and text completions share between the wire and the engine.

In: a validated request model and the ServedModel it addresses. Out: SamplingParams (the model's
generation_config defaults under the request's values), the context-length check OpenAI makes
before generating, logprob conversion to OpenAI's two logprob shapes, the chunk frame builder, and a merge of
several engine streams (n prompts of one completion request) into one ordered stream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from heron.outputs import RequestOutput, TokenLogprob
from heron.sampling_params import SamplingParams
from heron.server.errors import APIError, bad_request
from heron.server.protocol import ChatCompletionTokenLogprob, GenerationRequest, TopLogprob
from heron.server.protocol.common import PromptLogprob
from heron.server.protocol.common import now_unix
from heron.server.registry import ServedModel
from heron.server.sse import data_frame


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def check_text_length(model: ServedModel, num_chars: int, param: str) -> None:
    """400 before tokenizing a text that cannot fit the context whatever its tokens: tokenizing a
    10 MB message costs seconds of CPU only to be refused."""
    limit = model.max_model_len * model.max_token_chars * 2
    if num_chars > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {model.max_model_len} tokens. However, your {param} "
            f"{'are' if param.endswith('s') else 'is'} {num_chars} characters long, more than that many tokens can "
            f"hold. Please reduce the length of the {param}.",
            param=param,
            code="context_length_exceeded",
        )


def check_context(model: ServedModel, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
    """The max_tokens to generate; 400 with OpenAI's numbers when the prompt cannot fit."""
    limit = model.max_model_len
    if num_prompt_tokens == 0:
        raise bad_request("The prompt is empty: it must contain at least one token.", param=param)
    if max_tokens is None:
        if num_prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                f"{num_prompt_tokens} tokens, which leaves no room for output. Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return limit - num_prompt_tokens
    if num_prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in the "
            f"completion). Please reduce the length of the {param} or completion.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    request: GenerationRequest,
    model: ServedModel,
    *,
    max_tokens: int,
    n: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    default_seed: int | None = None,
) -> SamplingParams:
    """Request values over the model's generation_config over OpenAI's defaults."""
    defaults = model.generation_defaults

    def pick(name: str, openai_default: Any) -> Any:
        value = getattr(request, name)
        if value is not None:
            return value
        return defaults.get(name, openai_default)

    logit_bias = None
    if request.logit_bias:
        logit_bias = {}
        for key, bias in request.logit_bias.items():
            token_id = int(key)
            if token_id >= model.vocab_size:
                raise bad_request(
                    f"Invalid key in 'logit_bias': {key}. Token ids must be below the vocabulary size {model.vocab_size}.",
                    param="logit_bias",
                )
            logit_bias[token_id] = float(bias)
    stop_token_ids = list(request.stop_token_ids or [])
    for token_id in stop_token_ids:
        if token_id >= model.vocab_size:
            raise bad_request(
                f"Invalid 'stop_token_ids': {token_id} is not below the vocabulary size {model.vocab_size}.",
                param="stop_token_ids",
            )
    stop = request.stop
    top_k = pick("top_k", 0)
    try:
        return SamplingParams(
            n=n,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=0 if top_k in (-1, 0) else int(top_k),
            min_p=float(pick("min_p", 0.0)),
            presence_penalty=float(request.presence_penalty or 0.0),
            frequency_penalty=float(request.frequency_penalty or 0.0),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            logit_bias=logit_bias,
            seed=request.seed if request.seed is not None else default_seed,
            max_tokens=max_tokens,
            min_tokens=min(request.min_tokens, max_tokens),
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            stop_token_ids=stop_token_ids,
            ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


class TokenText:
    """Token id -> (text, UTF-8 bytes) as logprobs show them, cached per id."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._tokenizer.token_bytes(token_id)
            # A token holding part of a multi-byte character has no text of its own; its bytes say
            # what it is, which is why OpenAI sends `bytes` beside `token`.
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit


def shown_logprobs(entries: list[TokenLogprob] | None, completion) -> list[TokenLogprob]:
    """The logprobs of the tokens the text shows: an EOS or stop token that ended the text without
    appearing in it (the engine says so) is left out, so the tokens join back to the content, as in
    OpenAI."""
    entries = list(entries or [])
    return entries[:-1] if completion.last_token_hidden and entries else entries


def chat_logprobs(entries: list[TokenLogprob], text: TokenText, top_n: int) -> list[ChatCompletionTokenLogprob]:
    result = []
    for entry in entries:
        token, raw = text(entry.token_id)
        top = []
        for token_id, logprob in entry.top[:top_n]:
            alt, alt_raw = text(token_id)
            top.append(TopLogprob(token=alt, logprob=logprob, bytes=alt_raw))
        result.append(ChatCompletionTokenLogprob(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return result


def vllm_prompt_logprobs(
    entries: list[TokenLogprob | None] | None, token_ids: list[int], text: TokenText, top_n: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token its `top_n` best candidates and itself, by id."""
    result: list[dict[str, PromptLogprob] | None] = []
    for token_id, entry in zip(token_ids, entries or [None] * len(token_ids)):
        if entry is None:
            result.append(None)
            continue
        shown = {
            str(alt): PromptLogprob(logprob=logprob, rank=rank, decoded_token=text(alt)[0])
            for rank, (alt, logprob) in enumerate(entry.top[:top_n], start=1)
        }
        shown.setdefault(
            str(token_id), PromptLogprob(logprob=entry.logprob, rank=entry.rank, decoded_token=text(token_id)[0])
        )
        result.append(shown)
    return result


def completion_logprob_lists(
    entries: list[TokenLogprob | None], token_ids: list[int], text: TokenText, top_n: int, offset: int
) -> tuple[list[str], list[float | None], list[dict[str, float] | None], list[int], int]:
    """tokens, token_logprobs, top_logprobs, text_offset for the legacy completions shape."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, entry in zip(token_ids, entries):
        token, _ = text(token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if entry is None:  # the first prompt token: nothing predicted it
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry.logprob)
        # As vLLM does: the top alternatives plus the chosen token, so the chosen one is always there.
        top = {text(i)[0]: lp for i, lp in entry.top[:top_n]}
        top.setdefault(token, entry.logprob)
        tops.append(top)
    return tokens, token_logprobs, tops, offsets, offset


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------


def chunk_writer(chunk_class: type, prepared: Any, usage: Callable[[], Any] | None = None) -> Callable[..., bytes]:
    """An SSE frame builder for one streamed response: every chunk shares id, created, model and
    fingerprint. With `usage` (stream_options.include_usage), a chunk carries `usage: null`, or
    with continuous_usage_stats the usage so far, unless it is the usage chunk."""
    created = now_unix()
    options = prepared.request.stream_options
    running = usage is not None and bool(options and options.continuous_usage_stats)

    def frame(choices: list, **extra: Any) -> bytes:
        if usage is not None and "usage" not in extra:
            extra["usage"] = usage() if running else None
        return data_frame(
            chunk_class(
                id=prepared.response_id,
                created=created,
                model=prepared.request.model,
                system_fingerprint=prepared.model.system_fingerprint,
                choices=choices,
                **extra,
            ).model_dump_json()
        )

    return frame


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as their outputs arrive, tagged with the stream's index.

    Closing this iterator early closes every input stream, which aborts their requests.
    """
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()  # suspended at its yield, so this aborts it now, not at GC
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, done))
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump throws into its stream, whose own cleanup aborts the request.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
