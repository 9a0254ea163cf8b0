"""POST /v1/completions: the legacy text-completion endpoint, OpenAI's shapes exactly.

`prepare_completion()` turns the prompt forms (string, strings, token ids, lists of token ids) into
token lists, applies `suffix` through the model's fill-in-the-middle tokens, checks each prompt
against the context, and builds the sampling params. One engine request runs per prompt; choice
`p * n + i` is sample i of prompt p, as in OpenAI. `best_of` generates that many samples and keeps
the `n` with the highest total log-probability. `max_tokens: 0` (useful with `echo` to score a
prompt) runs one step for the prompt logprobs and returns no generated text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from heron.outputs import CompletionOutput, FinishReason, RequestOutput
from heron.sampling_params import SamplingParams
from heron.server.errors import APIError, bad_request
from heron.server.protocol import (
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
)
from heron.server.registry import ServedModel
from heron.server.structured_outputs import Constraint, compile_constraint, constraint_from
from heron.structured import CompiledGrammar
from heron.server.serving_common import (
    SSE_DONE,
    TokenText,
    check_context,
    check_text_length,
    chunk_writer,
    completion_logprob_lists,
    random_id,
    request_error_from,
    sampling_params,
    shown_logprobs,
    sse_error,
    usage,
)


@dataclass
class PreparedPrompt:
    text: str | None  # what `echo` shows; None for token prompts until decoded
    token_ids: list[int]


@dataclass
class PreparedCompletion:
    request: CompletionRequest
    model: ServedModel
    response_id: str
    prompts: list[PreparedPrompt]
    params: SamplingParams
    n: int  # choices per prompt returned
    logprobs: int | None  # the request's logprobs (None: off)
    echo: bool
    score_only: bool  # max_tokens == 0: the generated token is dropped
    extra: dict = field(default_factory=dict)
    constraint: Constraint | None = None
    grammar: CompiledGrammar | None = None  # set by compile_completion
    # Choice index -> the finish_reason sent for it, filled as choices end (for the request log).
    finish_reasons: dict[int, str] = field(default_factory=dict)


def num_completion_prompts(request: CompletionRequest) -> int:
    """How many prompts (so engine requests) the request makes, known before tokenizing."""
    prompt = request.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def encode_prompt_text(model: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
    """A prompt string's ids: its special-token spellings are control tokens unless the server was
    started with `--special-tokens-in-prompts none` (the caller writes the whole prompt, as in vLLM)."""
    return model.tokenizer.encode(
        text, add_special_tokens=add_special_tokens, parse_special=model.special_tokens_in_prompts != "none"
    )


def _prompts(request: CompletionRequest, model: ServedModel) -> list[PreparedPrompt]:
    prompt = request.prompt
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif isinstance(prompt[0], str):
        texts = list(prompt)
    else:
        texts = None
    if texts is not None:
        for text in texts:
            check_text_length(model, len(text) + len(request.suffix or ""), "prompt")
    if request.suffix is not None:
        if model.fim_tokens is None:
            raise bad_request(
                "This model has no fill-in-the-middle tokens, so it cannot complete with a 'suffix'.",
                param="suffix",
            )
        if texts is None:
            raise bad_request("'suffix' needs the prompt as text, not token ids.", param="suffix")
        prefix_id, suffix_id, middle_id = model.fim_tokens
        suffix_ids = encode_prompt_text(model, request.suffix, False)
        return [
            PreparedPrompt(
                text,
                [prefix_id, *encode_prompt_text(model, text, False), suffix_id, *suffix_ids, middle_id],
            )
            for text in texts
        ]
    if texts is not None:
        return [PreparedPrompt(text, encode_prompt_text(model, text, True)) for text in texts]
    token_lists = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
    for p, ids in enumerate(token_lists):
        for token_id in ids:
            if token_id >= model.vocab_size:
                where = "prompt" if isinstance(prompt[0], int) else f"prompt[{p}]"
                raise bad_request(
                    f"Invalid token id {token_id} in '{where}': token ids must be below the vocabulary size "
                    f"{model.vocab_size}.",
                    param="prompt",
                )
    return [PreparedPrompt(None, ids) for ids in token_lists]


def prepare_completion(request: CompletionRequest, model: ServedModel, default_seed: int | None) -> PreparedCompletion:
    prompts = _prompts(request, model)
    requested = request.max_tokens
    score_only = requested == 0
    if score_only and not request.echo:
        raise bad_request("'max_tokens' may be 0 only together with 'echo', to score the prompt.", param="max_tokens")
    longest = max(len(p.token_ids) for p in prompts)
    max_tokens = check_context(model, longest, 1 if score_only else requested, "prompt")
    n = request.n or 1
    best_of = request.best_of or n
    logprobs = request.logprobs
    # Ranking best_of candidates needs each one's log-probability, asked for or not.
    engine_logprobs = logprobs if logprobs is not None else (0 if best_of > n else None)
    params = sampling_params(
        request,
        model,
        max_tokens=max_tokens,
        n=best_of,
        logprobs=engine_logprobs,
        prompt_logprobs=logprobs if request.echo and logprobs is not None else None,
        default_seed=default_seed,
    )
    constraint = constraint_from(request)
    if constraint is not None:
        params.structured_outputs = constraint.spec
    return PreparedCompletion(
        request, model, random_id("cmpl-"), prompts, params, n, logprobs, bool(request.echo), score_only,
        constraint=constraint,
    )


async def compile_completion(prepared: PreparedCompletion) -> None:
    """Compile the output constraint off the event loop (400 if it is refused)."""
    if prepared.constraint is not None:
        prepared.grammar = await compile_constraint(prepared.model, prepared.constraint)


def _best(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    if len(completions) <= n:
        return completions
    ranked = sorted(completions, key=lambda c: sum(lp.logprob for lp in c.logprobs or []), reverse=True)
    return ranked[:n]


def _finish(reason: FinishReason | None, score_only: bool) -> str:
    if reason == FinishReason.ABORT:
        raise APIError(503, "The request was cancelled because the server is shutting down.", code="request_cancelled")
    return "length" if score_only else reason.value


def _prompt_text(prepared: PreparedCompletion, prompt: PreparedPrompt) -> str:
    if prompt.text is None:
        prompt.text = prepared.model.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    return prompt.text


async def completion_response(
    prepared: PreparedCompletion, streams: AsyncIterator[tuple[int, RequestOutput]]
) -> CompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async for index, output in streams:
        if output.finished:
            finals[index] = output
    text = TokenText(prepared.model.tokenizer)
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for p, prompt in enumerate(prepared.prompts):
        final = finals[p]
        prompt_tokens += len(prompt.token_ids)
        cached += final.num_cached_tokens
        for i, completion in enumerate(_best(final.outputs, prepared.n)):
            body = "" if prepared.score_only else completion.text
            token_ids = [] if prepared.score_only else completion.token_ids
            completion_tokens += len(token_ids)
            logprobs = None
            if prepared.logprobs is not None:
                entries: list = [] if prepared.score_only else shown_logprobs(completion.logprobs, completion)
                ids = list(token_ids)
                if prepared.echo:
                    entries = list(final.prompt_logprobs or [None] * len(prompt.token_ids)) + entries
                    ids = prompt.token_ids + ids
                tokens, token_logprobs, tops, offsets, _ = completion_logprob_lists(
                    entries, ids, text, prepared.logprobs, 0
                )
                logprobs = CompletionLogprobs(
                    text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=tops
                )
            finish_reason = prepared.finish_reasons[p * prepared.n + i] = _finish(
                completion.finish_reason, prepared.score_only
            )
            choices.append(
                CompletionResponseChoice(
                    index=p * prepared.n + i,
                    text=(_prompt_text(prepared, prompt) + body) if prepared.echo else body,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=None if prepared.score_only else completion.stop_reason,
                )
            )
    return CompletionResponse(
        id=prepared.response_id,
        model=prepared.request.model,
        system_fingerprint=prepared.model.system_fingerprint,
        choices=choices,
        usage=usage(prompt_tokens, completion_tokens, cached),
    )


async def completion_stream(
    prepared: PreparedCompletion, streams: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[bytes]:
    """SSE frames; `best_of > n` cannot stream (the protocol layer refuses it)."""
    request = prepared.request
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    chunk = chunk_writer(CompletionChunk, prepared, include_usage)
    text = TokenText(prepared.model.tokenizer)
    n = prepared.n

    # Per choice: text offset so far (for logprobs), whether the echo went out, whether it finished.
    offsets: dict[int, int] = {}
    echoed: set[int] = set()
    finished: set[int] = set()
    finals: dict[int, RequestOutput] = {}
    try:
        if prepared.echo and prepared.logprobs is None:
            # Without logprobs the echo needs nothing from the engine: send it at once.
            for p, prompt in enumerate(prepared.prompts):
                for i in range(n):
                    index = p * n + i
                    echoed.add(index)
                    offsets[index] = len(_prompt_text(prepared, prompt))
                    yield chunk([CompletionResponseStreamChoice(index=index, text=_prompt_text(prepared, prompt))])
        async for p, output in streams:
            prompt = prepared.prompts[p]
            if output.finished:
                finals[p] = output
            for completion in output.outputs:
                index = p * n + completion.index
                if index in finished:
                    continue
                if prepared.echo and index not in echoed:
                    # With logprobs, the echo waits for the prompt logprobs (they come with the first output).
                    echoed.add(index)
                    prompt_text = _prompt_text(prepared, prompt)
                    tokens, lps, tops, offs, end = completion_logprob_lists(
                        list(output.prompt_logprobs or [None] * len(prompt.token_ids)),
                        prompt.token_ids,
                        text,
                        prepared.logprobs,
                        0,
                    )
                    offsets[index] = end
                    yield chunk(
                        [
                            CompletionResponseStreamChoice(
                                index=index,
                                text=prompt_text,
                                logprobs=CompletionLogprobs(
                                    text_offset=offs, token_logprobs=lps, tokens=tokens, top_logprobs=tops
                                ),
                            )
                        ]
                    )
                delta_text = "" if prepared.score_only else completion.delta_text
                logprobs = None
                shown = shown_logprobs(completion.delta_logprobs, completion)
                if prepared.logprobs is not None and shown and not prepared.score_only:
                    tokens, lps, tops, offs, end = completion_logprob_lists(
                        shown,
                        completion.delta_token_ids,
                        text,
                        prepared.logprobs,
                        offsets.get(index, 0),
                    )
                    offsets[index] = end
                    logprobs = CompletionLogprobs(text_offset=offs, token_logprobs=lps, tokens=tokens, top_logprobs=tops)
                if delta_text or logprobs is not None:
                    yield chunk([CompletionResponseStreamChoice(index=index, text=delta_text, logprobs=logprobs)])
                if completion.finish_reason is not None:
                    finished.add(index)
                    finish_reason = prepared.finish_reasons[index] = _finish(completion.finish_reason, prepared.score_only)
                    yield chunk(
                        [
                            CompletionResponseStreamChoice(
                                index=index,
                                text="",
                                finish_reason=finish_reason,
                                stop_reason=None if prepared.score_only else completion.stop_reason,
                            )
                        ]
                    )
        if include_usage:
            prompt_tokens = sum(len(p.token_ids) for p in prepared.prompts)
            completion_tokens = 0 if prepared.score_only else sum(
                len(c.token_ids) for final in finals.values() for c in final.outputs
            )
            cached = sum(final.num_cached_tokens for final in finals.values())
            yield chunk([], usage=usage(prompt_tokens, completion_tokens, cached))
    except Exception as exc:  # after the first byte the status is sent: report in the stream
        yield sse_error(request_error_from(exc))
    finally:
        # Leaving early (client gone) must abort the engine request now, not when collected.
        await streams.aclose()
    yield SSE_DONE
