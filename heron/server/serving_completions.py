"""POST /v1/completions: the legacy text-completion endpoint, OpenAI's shapes exactly.

`prepare_completion()` turns the prompt forms (string, strings, token ids, lists of token ids) into
token lists, applies `suffix` through the model's fill-in-the-middle tokens, checks each prompt
against the context, and builds the sampling params. One engine request runs per prompt; choice
`p * n + i` is sample i of prompt p, as in OpenAI. `completion_events()` turns engine outputs into
the answer's events; `CompletionStreamWriter` renders them as chunks and `completion_body()` builds
the non-streamed response from the same events. `best_of` generates that many samples and keeps
the `n` with the highest total log-probability. `max_tokens: 0` (useful with `echo` to score a
prompt) runs one step for the prompt logprobs and returns no generated text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from heron.outputs import FinishReason, RequestOutput
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
from heron.server.accumulator import Accumulator, Choice, ChoiceEnd, Echo, PromptDone, TextDelta
from heron.server.serving_common import (
    TokenText,
    check_context,
    check_text_length,
    chunk_writer,
    completion_logprob_lists,
    random_id,
    sampling_params,
    shown_logprobs,
    vllm_prompt_logprobs,
)
from heron.server.sse import SSE_DONE, error_frame


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


def _prompt_logprobs(request: CompletionRequest) -> int | None:
    """How many alternatives the engine reports per prompt token: for `echo` with `logprobs`
    (OpenAI) and for `prompt_logprobs` (vLLM), whichever wants more."""
    wanted = [k for k in (request.logprobs if request.echo else None, request.prompt_logprobs) if k is not None]
    return max(wanted) if wanted else None


def _truncated(request: CompletionRequest, model: ServedModel, prompts: list[PreparedPrompt]) -> list[PreparedPrompt]:
    """vLLM's truncate_prompt_tokens: each prompt cut to its last (or, truncation_side "right",
    first) k tokens; -1 is the model's context length."""
    keep = request.truncate_prompt_tokens
    if keep is None:
        return prompts
    if keep == -1:
        keep = model.max_model_len
    if keep == 0 or keep > model.max_model_len:
        raise bad_request(
            f"'truncate_prompt_tokens' must be -1 or between 1 and the model's context length "
            f"{model.max_model_len}; it is {keep}.",
            param="truncate_prompt_tokens",
        )
    right = request.truncation_side == "right"
    result = []
    for prompt in prompts:
        if len(prompt.token_ids) <= keep:
            result.append(prompt)
        else:
            # The echo shows what the model saw: decoded from the kept ids.
            result.append(PreparedPrompt(None, prompt.token_ids[:keep] if right else prompt.token_ids[-keep:]))
    return result


def prepare_completion(request: CompletionRequest, model: ServedModel, default_seed: int | None) -> PreparedCompletion:
    prompts = _truncated(request, model, _prompts(request, model))
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
        prompt_logprobs=_prompt_logprobs(request),
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


def _finish(reason: FinishReason | None, score_only: bool) -> str:
    if reason == FinishReason.ABORT:
        raise APIError(503, "The request was cancelled because the server is shutting down.", code="request_cancelled")
    return "length" if score_only else reason.value


def _prompt_text(prepared: PreparedCompletion, prompt: PreparedPrompt) -> str:
    if prompt.text is None:
        prompt.text = prepared.model.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    return prompt.text


async def completion_events(
    prepared: PreparedCompletion, streams: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[Any]:
    """The answer's events. Candidate `c` of prompt `p` is index `p * best_of + c` (with best_of
    = n, which is all a stream may ask, that is the choice index). Closing this closes `streams`."""
    per_prompt = prepared.params.n
    echoed: set[int] = set()
    finished: set[int] = set()
    try:
        if prepared.echo and prepared.logprobs is None:
            # Without logprobs the echo needs nothing from the engine: it goes out at once.
            for p, prompt in enumerate(prepared.prompts):
                for c in range(per_prompt):
                    echoed.add(p * per_prompt + c)
                    yield Echo(p * per_prompt + c, _prompt_text(prepared, prompt), prompt.token_ids, [])
        async for p, output in streams:
            prompt = prepared.prompts[p]
            for completion in output.outputs:
                index = p * per_prompt + completion.index
                if index in finished:
                    continue
                if prepared.echo and index not in echoed:
                    # With logprobs, the echo waits for the prompt logprobs (they come with the first output).
                    echoed.add(index)
                    entries = list(output.prompt_logprobs or [None] * len(prompt.token_ids))
                    yield Echo(index, _prompt_text(prepared, prompt), prompt.token_ids, entries)
                raw = completion.delta_logprobs or []
                if prepared.score_only:
                    yield TextDelta(index, "", [], [], sum(e.logprob for e in raw))
                else:
                    shown = shown_logprobs(raw, completion) if prepared.logprobs is not None else []
                    yield TextDelta(
                        index, completion.delta_text, list(completion.delta_token_ids), shown, sum(e.logprob for e in raw)
                    )
                if completion.finish_reason is not None:
                    finished.add(index)
                    stop_reason = None if prepared.score_only else completion.stop_reason
                    yield ChoiceEnd(index, _finish(completion.finish_reason, prepared.score_only), stop_reason)
            if output.finished:
                yield PromptDone(p, output.num_cached_tokens, output.prompt_logprobs)
    finally:
        await streams.aclose()


def completion_accumulator(prepared: PreparedCompletion) -> Accumulator:
    # The stream's choice indices are final as they come; ranked best_of candidates are renumbered
    # when the body is built.
    num_prompt_tokens = sum(len(p.token_ids) for p in prepared.prompts)
    return Accumulator(num_prompt_tokens, prepared.finish_reasons if prepared.params.n == prepared.n else {})


def _chosen(prepared: PreparedCompletion, accumulated: Accumulator) -> list[list[Choice]]:
    """Per prompt, the choices returned: all samples, or the `n` best of `best_of` by total
    log-probability."""
    per_prompt = prepared.params.n
    chosen = []
    for p in range(len(prepared.prompts)):
        candidates = [accumulated.choice(p * per_prompt + c) for c in range(per_prompt)]
        if per_prompt > prepared.n:
            candidates = sorted(candidates, key=lambda c: c.logprob_sum, reverse=True)[: prepared.n]
        chosen.append(candidates)
    return chosen


def _logprobs(
    prepared: PreparedCompletion, text: TokenText, entries: list, token_ids: list[int], offset: int
) -> tuple[CompletionLogprobs, int]:
    tokens, token_logprobs, tops, offsets, end = completion_logprob_lists(entries, token_ids, text, prepared.logprobs, offset)
    return CompletionLogprobs(text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=tops), end


def completion_body(prepared: PreparedCompletion, accumulated: Accumulator) -> CompletionResponse:
    """The non-streamed response, from the same events a stream sends."""
    text = TokenText(prepared.model.tokenizer)
    request = prepared.request
    choices = []
    counted = []
    for p, candidates in enumerate(_chosen(prepared, accumulated)):
        prompt_ids = prepared.prompts[p].token_ids
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            done = accumulated.prompts.get(p)
            prompt_logprobs = vllm_prompt_logprobs(
                done.prompt_logprobs if done else None, prompt_ids, text, request.prompt_logprobs
            )
        for i, choice in enumerate(candidates):
            index = p * prepared.n + i
            counted.append(choice)
            logprobs = None
            if prepared.logprobs is not None:
                entries, ids = list(choice.logprobs), list(choice.token_ids)
                if choice.echo is not None:
                    entries, ids = list(choice.echo.logprobs) + entries, choice.echo.token_ids + ids
                logprobs, _ = _logprobs(prepared, text, entries, ids, 0)
            prepared.finish_reasons[index] = choice.finish_reason
            choices.append(
                CompletionResponseChoice(
                    index=index,
                    text=(choice.echo.text if choice.echo is not None else "") + choice.text,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                    prompt_logprobs=prompt_logprobs,
                    token_ids=choice.token_ids if request.return_token_ids else None,
                    prompt_token_ids=prompt_ids if request.return_token_ids else None,
                )
            )
    return CompletionResponse(
        id=prepared.response_id,
        model=prepared.request.model,
        system_fingerprint=prepared.model.system_fingerprint,
        choices=choices,
        usage=accumulated.usage(counted),
    )


class CompletionStreamWriter:
    """text_completion chunks: the echo, text deltas, one finish chunk per choice, the usage chunk
    when asked for, `[DONE]`. (`best_of > n` cannot stream; the protocol layer refuses it.)"""

    def __init__(self, prepared: PreparedCompletion, accumulated: Accumulator) -> None:
        request = prepared.request
        self.prepared = prepared
        self.accumulated = accumulated
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.chunk = chunk_writer(CompletionChunk, prepared, accumulated.usage if self.include_usage else None)
        self.token_ids = bool(request.return_token_ids)
        self.opened: set[int] = set()  # choices whose first chunk went out (it carries prompt_token_ids)
        self.text = TokenText(prepared.model.tokenizer)
        self.offsets: dict[int, int] = {}  # per choice: the text offset so far, for logprobs

    def start(self) -> list[bytes]:
        return []

    def _choice(self, index: int, text: str, **fields: Any) -> CompletionResponseStreamChoice:
        if self.token_ids and index not in self.opened:
            fields["prompt_token_ids"] = self.prepared.prompts[index // self.prepared.n].token_ids
        self.opened.add(index)
        return CompletionResponseStreamChoice(index=index, text=text, **fields)

    def write(self, event: Any) -> list[bytes]:
        prepared = self.prepared
        if isinstance(event, Echo):
            logprobs = None
            self.offsets[event.index] = len(event.text)
            if prepared.logprobs is not None:
                logprobs, self.offsets[event.index] = _logprobs(prepared, self.text, event.logprobs, event.token_ids, 0)
            return [self.chunk([self._choice(event.index, event.text, logprobs=logprobs)])]
        if isinstance(event, TextDelta):
            logprobs = None
            if prepared.logprobs is not None and event.logprobs:
                logprobs, self.offsets[event.index] = _logprobs(
                    prepared, self.text, event.logprobs, event.token_ids, self.offsets.get(event.index, 0)
                )
            token_ids = event.token_ids if self.token_ids and event.token_ids else None
            if not event.text and logprobs is None and token_ids is None:
                return []
            return [self.chunk([self._choice(event.index, event.text, logprobs=logprobs, token_ids=token_ids)])]
        if isinstance(event, ChoiceEnd):
            choice = self._choice(event.index, "", finish_reason=event.finish_reason, stop_reason=event.stop_reason)
            return [self.chunk([choice])]
        return []

    def finish(self) -> list[bytes]:
        frames = [self.chunk([], usage=self.accumulated.usage())] if self.include_usage else []
        return [*frames, SSE_DONE]

    def fail(self, error: APIError) -> list[bytes]:
        return [error_frame(error), SSE_DONE]
