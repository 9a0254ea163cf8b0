"""POST /v1/chat/completions: a validated ChatCompletionRequest in, OpenAI's response or chunks out.

`prepare_chat()` does everything that can fail before a byte is sent (features Heron cannot honour,
chat template rendering, tokenization, the context-length check, sampling params), so a streamed
request that is going to fail fails with a proper status code. `chat_events()` turns the engine's
outputs into the answer's events (the thinking split off first by the model's reasoning parser,
then tool calls read from the rest); `ChatStreamWriter` renders them as chunks, `chat_body()`
builds the non-streamed response from the same events folded by the accumulator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from dataclasses import dataclass, field, replace

from heron.models.chat_template import ChatTemplateError
from heron.parsers import ReasoningParser, get_reasoning_parser
from heron.outputs import FinishReason, RequestOutput
from heron.sampling_params import SamplingParams
from heron.server.errors import APIError, bad_request
from heron.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionMessageToolCall,
    ChatCompletionLogprobs,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    FunctionCall,
)
from heron.server.registry import ServedModel
from heron.server.structured_outputs import Constraint, compile_constraint, constraint_from
from heron.server.tool_calls import (
    ToolCallExtractor,
    ToolPlan,
    conversation_for_template,
    plan_tools,
    tool_constraint,
    tool_schemas_to_check,
)
from heron.structured import CompiledGrammar
from heron.server.accumulator import Accumulator, Choice, ChoiceEnd, PromptDone, ReasoningDelta, TextDelta, ToolCalls
from heron.server.serving_common import (
    TokenText,
    chat_logprobs,
    check_context,
    check_text_length,
    chunk_writer,
    random_id,
    sampling_params,
    shown_logprobs,
    vllm_prompt_logprobs,
)
from heron.server.sse import SSE_DONE, error_frame

_TEXT_PART_TYPES = {"text", "refusal"}


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    model: ServedModel
    response_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs
    tools: ToolPlan | None = None
    constraint: Constraint | None = None
    grammar: CompiledGrammar | None = None  # set by compile_chat
    # Choice index -> the finish_reason sent for it, filled as choices end (for the request log).
    finish_reasons: dict[int, str] = field(default_factory=dict)
    # The reasoning parser's class and its arguments for this prompt; None: no think blocks.
    reasoning: tuple[type[ReasoningParser], dict[str, bool]] | None = None

    def extractor(self) -> ToolCallExtractor | None:
        return ToolCallExtractor(self.tools) if self.tools is not None else None

    def reasoner(self) -> ReasoningParser | None:
        if self.reasoning is None:
            return None
        parser, kwargs = self.reasoning
        return parser(**kwargs)


def reasoning_for(model: ServedModel, prompt: str, constraint: Constraint | None) -> tuple[type[ReasoningParser], dict[str, bool]] | None:
    """The model's reasoning parser set up for this prompt: whether the template opened (or
    closed) the block in the prompt. A constrained output is shaped by its grammar from the first
    token, so there a block counts only when the output writes it out; a tool choice forced by a
    grammar has no block at all."""
    if model.reasoning_parser is None or (constraint is not None and constraint.param == "tools"):
        return None
    parser = get_reasoning_parser(model.reasoning_parser)
    kwargs = parser.prompt_state(prompt)
    if constraint is not None:
        kwargs = {"implicit_start": False, **({"prompt_closed": True} if kwargs.get("prompt_closed") else {})}
    return parser, kwargs


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


def _escaped(value, escape):
    """`value` (JSON-like) with `escape` applied to every string in it, keys included."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {_escaped(k, escape): _escaped(v, escape) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v, escape) for v in value]
    return value


def _num_chars(value) -> int:
    """Characters in every string of `value` (JSON-like), walked without recursion."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total


def render_chat_prompt(
    model: ServedModel,
    messages: list,
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict | None,
    tools: ToolPlan | None = None,
    check_length: bool = False,
) -> str:
    """The prompt text; tokenize it with `tokenizer.encode_rendered` (client text may carry escapes).
    `check_length`: refuse messages too long for the context before any work that grows with them
    (escaping scans every character holding the GIL: ~0.1 s for 10 MB, with /health waiting)."""
    if model.chat_template is None:
        raise bad_request(
            "This model has no chat template, so it cannot serve chat requests; use /v1/completions or start "
            "the server with --chat-template.",
            param="messages",
        )
    dumped = [m.model_dump(by_alias=True, exclude_none=True) for m in messages]
    if check_length:
        check_text_length(model, _num_chars(dumped), "messages")
    kwargs = dict(chat_template_kwargs or {})
    if model.special_tokens_in_prompts != "all":
        # Everything the client wrote reaches the template with its special-token spellings
        # escaped, so `encode_rendered` keeps only the template's own control tokens.
        escape = model.tokenizer.escape_special
        try:
            dumped, kwargs = _escaped(dumped, escape), _escaped(kwargs, escape)
            if tools is not None:
                tools = replace(tools, tools=_escaped(tools.tools, escape))
        except RecursionError as exc:
            raise bad_request(
                "'chat_template_kwargs' or the messages are nested too deeply.", param="chat_template_kwargs"
            ) from exc
    conversation, template_tools = conversation_for_template(dumped, tools, model.chat_template.supports_tools)
    for reserved in ("messages", "add_generation_prompt", "continue_final_message", "tools", "documents"):
        if reserved in kwargs:
            raise bad_request(f"'chat_template_kwargs' must not set '{reserved}'.", param="chat_template_kwargs")
    try:
        return model.chat_template.render(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=template_tools,
            **kwargs,
        )
    except ChatTemplateError as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc
    except RecursionError as exc:
        raise bad_request("'chat_template_kwargs' or the messages are nested too deeply.", param="chat_template_kwargs") from exc


def prepare_chat(request: ChatCompletionRequest, model: ServedModel, default_seed: int | None) -> PreparedChat:
    _reject_unsupported(request)
    tools = plan_tools(request, model.tool_call_parser)
    prompt = render_chat_prompt(
        model,
        request.messages,
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        chat_template_kwargs=request.chat_template_kwargs,
        tools=tools,
        check_length=True,
    )
    check_text_length(model, len(prompt), "messages")  # with what the template added
    # The template writes any BOS it wants itself.
    prompt_ids = model.tokenizer.encode_rendered(prompt, add_special_tokens=False)
    max_tokens = check_context(model, len(prompt_ids), request.requested_max_tokens(), "messages")
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(
        request,
        model,
        max_tokens=max_tokens,
        n=request.n or 1,
        logprobs=top_logprobs,
        prompt_logprobs=request.prompt_logprobs,
        default_seed=default_seed,
    )
    constraint = constraint_from(request)
    if tools is not None and (tool_spec := tool_constraint(tools)) is not None:
        # A required or named tool call decides the output's shape; response_format applies to
        # replies that are not tool calls, and this one will be.
        constraint = Constraint(tool_spec, "tools", "tool schema")
    if constraint is not None:
        params.structured_outputs = constraint.spec
    prepared = PreparedChat(request, model, random_id("chatcmpl-"), prompt_ids, params, top_logprobs, tools, constraint)
    prepared.reasoning = reasoning_for(model, prompt, constraint)
    if tools is not None and tools.mode == "auto" and prepared.extractor().keeps_special_tokens:
        # The format's markers are special tokens: the parser must see them.
        params.skip_special_tokens = False
    return prepared


async def compile_chat(prepared: PreparedChat) -> None:
    """Compile the output constraint and check every tool schema, off the event loop (400 on error)."""
    if prepared.tools is not None:
        for param, spec in tool_schemas_to_check(prepared.tools):
            await compile_constraint(prepared.model, Constraint(spec, param, f"schema for '{param}'"))
    if prepared.constraint is not None:
        prepared.grammar = await compile_constraint(prepared.model, prepared.constraint)


def _finish_reason(reason: FinishReason) -> str:
    if reason == FinishReason.ABORT:
        raise APIError(503, "The request was cancelled because the server is shutting down.", code="request_cancelled")
    return reason.value


def _with_calls(finish_reason: str, prepared: PreparedChat, made_calls: bool) -> str:
    """A choice that called tools and ended normally ends with "tool_calls" ("function_call" for
    the legacy form); one cut short keeps "length"."""
    if made_calls and finish_reason == "stop":
        return "function_call" if prepared.tools.legacy else "tool_calls"
    return finish_reason


def _call_deltas(prepared: PreparedChat, index: int, calls) -> list[ChatCompletionResponseStreamChoice]:
    """OpenAI's shape: the first delta of a call names it, the next carries its arguments."""
    choices = []
    for call_index, call_id, call in calls:
        if prepared.tools.legacy:
            first = ChoiceDelta(content=None, function_call=ChoiceDeltaFunctionCall(name=call.name, arguments=""))
            rest = ChoiceDelta(function_call=ChoiceDeltaFunctionCall(arguments=call.arguments))
        else:
            first = ChoiceDelta(
                content=None,
                tool_calls=[
                    ChoiceDeltaToolCall(
                        index=call_index,
                        id=call_id,
                        type="function",
                        function=ChoiceDeltaToolCallFunction(name=call.name, arguments=""),
                    )
                ],
            )
            rest = ChoiceDelta(
                tool_calls=[ChoiceDeltaToolCall(index=call_index, function=ChoiceDeltaToolCallFunction(arguments=call.arguments))]
            )
        choices.append(ChatCompletionResponseStreamChoice(index=index, delta=first))
        choices.append(ChatCompletionResponseStreamChoice(index=index, delta=rest))
    return choices


async def chat_events(prepared: PreparedChat, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[Any]:
    """The answer's events (heron/server/accumulator.py), in the order a stream sends them:
    per update of a choice its text, the tool calls it completed, then its end; last, the
    prompt's counts. Closing this closes `outputs`, which aborts the engine request."""
    n = prepared.params.n
    finished: set[int] = set()
    extractors = [prepared.extractor() for _ in range(n)]
    reasoners = [prepared.reasoner() for _ in range(n)]
    try:
        async for output in outputs:
            for completion in output.outputs:
                index = completion.index
                if index in finished:
                    continue
                raw = completion.delta_logprobs or []
                shown = shown_logprobs(raw, completion) if prepared.top_logprobs is not None else []
                extractor = extractors[index]
                ending = completion.finish_reason is not None
                content, calls = completion.delta_text, []
                reasoner = reasoners[index]
                if reasoner is not None:
                    # Before the tool-call extractor: a call is read from the answer, never from
                    # inside the thinking.
                    thought, content = reasoner.feed(content, final=ending)
                    if thought:
                        # The update's tokens count as thinking when they wrote only thinking.
                        num_tokens = 0 if content else len(completion.delta_token_ids)
                        yield ReasoningDelta(index, thought, num_tokens)
                    elif not content and reasoner.thinking:
                        yield ReasoningDelta(index, "", len(completion.delta_token_ids))
                if extractor is not None:
                    content, calls = extractor.feed(content, final=ending)
                yield TextDelta(index, content, list(completion.delta_token_ids), shown, sum(e.logprob for e in raw))
                if calls:
                    yield ToolCalls(index, calls)
                if ending:
                    finished.add(index)
                    finish_reason = _finish_reason(completion.finish_reason)
                    if extractor is not None:
                        finish_reason = _with_calls(finish_reason, prepared, bool(extractor.calls))
                    yield ChoiceEnd(index, finish_reason, completion.stop_reason)
            if output.finished:
                yield PromptDone(0, output.num_cached_tokens, output.prompt_logprobs)
    finally:
        await outputs.aclose()


def chat_accumulator(prepared: PreparedChat) -> Accumulator:
    return Accumulator(len(prepared.prompt_token_ids), prepared.finish_reasons)


def _message(prepared: PreparedChat, choice: Choice) -> ChatCompletionMessage:
    content = choice.text
    thought = choice.reasoning or None
    reasoning = {"reasoning": thought, "reasoning_content": thought}
    if not choice.calls:
        return ChatCompletionMessage(content=content, **reasoning)
    if prepared.tools.legacy:
        _, _, call = choice.calls[0]
        return ChatCompletionMessage(
            content=content or None, function_call=FunctionCall(name=call.name, arguments=call.arguments), **reasoning
        )
    tool_calls = [
        ChatCompletionMessageToolCall(id=call_id, function=FunctionCall(name=call.name, arguments=call.arguments))
        for _, call_id, call in choice.calls
    ]
    return ChatCompletionMessage(content=content or None, tool_calls=tool_calls, **reasoning)


def chat_body(prepared: PreparedChat, accumulated: Accumulator) -> ChatCompletionResponse:
    """The non-streamed response, from the same events a stream sends."""
    text = TokenText(prepared.model.tokenizer)
    choices = []
    for index in range(prepared.params.n):
        choice = accumulated.choice(index)
        logprobs = None
        if prepared.top_logprobs is not None:
            logprobs = ChatCompletionLogprobs(
                content=chat_logprobs(choice.logprobs, text, prepared.top_logprobs), refusal=None
            )
        choices.append(
            ChatCompletionResponseChoice(
                index=index,
                message=_message(prepared, choice),
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
                token_ids=choice.token_ids if prepared.request.return_token_ids else None,
            )
        )
    prompt_logprobs = None
    if prepared.request.prompt_logprobs is not None:
        done = accumulated.prompts.get(0)
        prompt_logprobs = vllm_prompt_logprobs(
            done.prompt_logprobs if done else None, prepared.prompt_token_ids, text, prepared.request.prompt_logprobs
        )
    return ChatCompletionResponse(
        id=prepared.response_id,
        model=prepared.request.model,
        system_fingerprint=prepared.model.system_fingerprint,
        choices=choices,
        usage=accumulated.usage(),
        prompt_logprobs=prompt_logprobs,
        prompt_token_ids=prepared.prompt_token_ids if prepared.request.return_token_ids else None,
    )


class ChatStreamWriter:
    """chat.completion.chunk frames in OpenAI's order: a role delta per choice, reasoning deltas
    (`reasoning` and `reasoning_content`, the same text) and content deltas, tool-call deltas, one finish chunk per choice, the usage chunk when asked for, `[DONE]`."""

    def __init__(self, prepared: PreparedChat, accumulated: Accumulator) -> None:
        request = prepared.request
        self.prepared = prepared
        self.accumulated = accumulated
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.chunk = chunk_writer(ChatCompletionChunk, prepared, accumulated.usage if self.include_usage else None)
        self.token_ids = bool(request.return_token_ids)
        self.text = TokenText(prepared.model.tokenizer)

    def start(self) -> list[bytes]:
        # A forced tool call has no text: OpenAI opens such a message with `content: null`.
        tools = self.prepared.tools
        opening = None if tools is not None and tools.mode in ("required", "named") else ""
        prompt_ids = {"prompt_token_ids": self.prepared.prompt_token_ids} if self.token_ids else {}
        return [
            self.chunk(
                [ChatCompletionResponseStreamChoice(index=i, delta=ChoiceDelta(role="assistant", content=opening, refusal=None))],
                **(prompt_ids if i == 0 else {}),
            )
            for i in range(self.prepared.params.n)
        ]

    def write(self, event: Any) -> list[bytes]:
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return []
            delta = ChoiceDelta(reasoning=event.text, reasoning_content=event.text)
            return [self.chunk([ChatCompletionResponseStreamChoice(index=event.index, delta=delta)])]
        if isinstance(event, TextDelta):
            logprobs = None
            if self.prepared.top_logprobs is not None and event.logprobs:
                logprobs = ChatCompletionLogprobs(
                    content=chat_logprobs(event.logprobs, self.text, self.prepared.top_logprobs), refusal=None
                )
            token_ids = event.token_ids if self.token_ids and event.token_ids else None
            if not event.text and logprobs is None and token_ids is None:
                return []
            delta = ChoiceDelta(content=event.text)
            choice = ChatCompletionResponseStreamChoice(index=event.index, delta=delta, logprobs=logprobs, token_ids=token_ids)
            return [self.chunk([choice])]
        if isinstance(event, ToolCalls):
            return [self.chunk([choice]) for choice in _call_deltas(self.prepared, event.index, event.calls)]
        if isinstance(event, ChoiceEnd):
            choice = ChatCompletionResponseStreamChoice(
                index=event.index, delta=ChoiceDelta(), finish_reason=event.finish_reason, stop_reason=event.stop_reason
            )
            return [self.chunk([choice])]
        return []

    def finish(self) -> list[bytes]:
        frames = []
        if self.include_usage and self.accumulated.finished:
            frames.append(self.chunk([], usage=self.accumulated.usage()))
        return [*frames, SSE_DONE]

    def fail(self, error: APIError) -> list[bytes]:
        return [error_frame(error), SSE_DONE]
