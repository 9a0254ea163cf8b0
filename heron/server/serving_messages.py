"""POST /v1/messages: an Anthropic Messages request answered by the chat path, in Anthropic's shapes.

`prepare_message()` turns the request into a chat request with `to_chat_request` and prepares that
with `prepare_chat`, so templates, tool plans and grammars are chat's own (`count_input_tokens()`
stops there, for /v1/messages/count_tokens). The engine's outputs become chat's events
(`chat_events`), folded by the same accumulator; `message_body()` builds the Message from it, and
`MessagesStreamWriter` renders the events as Anthropic's named stream events, ending with the stop
reason and usage of the same `message_body()`.

Content layout, streamed or not: one `text` block (if the model wrote any text that is not just
whitespace), then one `tool_use` block per tool call. Calls are streamed when the choice ends, so
the text block always comes first, as in the collected message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from heron.server.accumulator import Accumulator, Choice, ChoiceEnd, ReasoningDelta, TextDelta
from heron.server.errors import APIError, validation_error
from heron.server.protocol.messages import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    InputJSONDeltaPayload,
    MessageDeltaEvent,
    MessageDeltaPayload,
    MessageDeltaUsage,
    MessageObject,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    MessageUsage,
    PingEvent,
    SignatureDeltaPayload,
    TextBlock,
    TextDeltaPayload,
    ThinkingBlock,
    ThinkingDeltaPayload,
    ToolUseBlock,
    anthropic_error_body,
    make_id,
    to_chat_request,
)
from heron.server.registry import ServedModel
from heron.server.serving_chat import PreparedChat, prepare_chat
from heron.server.sse import event_frame


@dataclass
class PreparedMessage:
    request: MessagesRequest
    chat: PreparedChat
    message_id: str = field(default_factory=lambda: make_id("msg"))
    # Chat tool-call id -> its `toolu_…` id, so a stream and its final message agree.
    _tool_ids: dict[str, str] = field(default_factory=dict)

    def tool_use_id(self, call_id: str) -> str:
        tool_id = self._tool_ids.get(call_id)
        if tool_id is None:
            tool_id = self._tool_ids[call_id] = make_id("toolu")
        return tool_id


def _prepare_chat(request: CountTokensRequest, model: ServedModel, default_seed: int | None) -> PreparedChat:
    try:
        chat_request = to_chat_request(request)
    except ValidationError as exc:
        raise validation_error(exc, request.model_dump()) from exc
    return prepare_chat(chat_request, model, default_seed)


def prepare_message(request: MessagesRequest, model: ServedModel, default_seed: int | None) -> PreparedMessage:
    """Everything that can fail before a byte is sent (a 400 names the Messages field)."""
    return PreparedMessage(request, _prepare_chat(request, model, default_seed))


def count_input_tokens(request: CountTokensRequest, model: ServedModel) -> int:
    """The prompt tokens /v1/messages would run for the same conversation, tools and system."""
    return len(_prepare_chat(request, model, None).prompt_token_ids)


# ---------------------------------------------------------------------------------------------
# Building the message from the accumulated events
# ---------------------------------------------------------------------------------------------


def _shows_text(text: str) -> bool:
    return bool(text.strip())


def stop_of(choice: Choice) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished choice. A stop string that ended it is the
    engine's `stop_reason`; EOS or a stop token id end the turn."""
    if choice.finish_reason == "length":
        return "max_tokens", None
    if choice.finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if isinstance(choice.stop_reason, str):
        return "stop_sequence", choice.stop_reason
    return "end_turn", None


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text) as the `input` object; {} if they are not an object."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _usage(accumulated: Accumulator) -> MessageUsage:
    usage = accumulated.usage()
    cached = usage.prompt_tokens_details.cached_tokens
    return MessageUsage(
        input_tokens=usage.prompt_tokens - cached,
        output_tokens=usage.completion_tokens,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=cached,
    )


def _tool_block(prepared: PreparedMessage, call_id: str, call: Any, *, empty: bool = False) -> ToolUseBlock:
    return ToolUseBlock(id=prepared.tool_use_id(call_id), name=call.name, input={} if empty else tool_input(call.arguments))


def message_body(prepared: PreparedMessage, accumulated: Accumulator) -> MessageObject:
    """The finished Message, from the same events a stream sends."""
    choice = accumulated.choice(0)
    content: list[Any] = []
    if choice.reasoning:
        content.append(ThinkingBlock(thinking=choice.reasoning))
    if _shows_text(choice.text):
        content.append(TextBlock(text=choice.text))
    content.extend(_tool_block(prepared, call_id, call) for _, call_id, call in choice.calls)
    stop_reason, stop_sequence = stop_of(choice)
    return MessageObject(
        id=prepared.message_id,
        model=prepared.request.model,
        content=content,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=_usage(accumulated),
    )


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _frame(event: Any) -> bytes:
    return event_frame(event.type, event.model_dump_json())


class MessagesStreamWriter:
    """Anthropic's Messages stream: message_start (empty content, the prompt's input_tokens) and a
    ping; for the text, content_block_start, content_block_delta (text_delta)...,
    content_block_stop; for each call, content_block_start (tool_use, input {}), one
    content_block_delta (input_json_delta), content_block_stop; then message_delta (stop reason,
    usage) and message_stop. A failure after the first byte is an `error` event."""

    def __init__(self, prepared: PreparedMessage, accumulated: Accumulator) -> None:
        self.prepared = prepared
        self.accumulated = accumulated
        self.thinking_index: int | None = None  # the thinking block's index once it opened
        self.thinking_closed = False
        self.text_index: int | None = None
        self.held = ""  # leading whitespace, sent once the text has something to show
        self.next_index = 0

    def start(self) -> list[bytes]:
        message = MessageObject(
            id=self.prepared.message_id,
            model=self.prepared.request.model,
            content=[],
            usage=MessageUsage(input_tokens=self.accumulated.num_prompt_tokens, output_tokens=0),
        )
        return [_frame(MessageStartEvent(message=message)), _frame(PingEvent())]

    def _close_thinking(self) -> list[bytes]:
        if self.thinking_index is None or self.thinking_closed:
            return []
        self.thinking_closed = True
        index = self.thinking_index
        return [
            _frame(ContentBlockDeltaEvent(index=index, delta=SignatureDeltaPayload(signature=""))),
            _frame(ContentBlockStopEvent(index=index)),
        ]

    def write(self, event: Any) -> list[bytes]:
        if isinstance(event, ReasoningDelta) and event.index == 0 and event.text:
            frames: list[bytes] = []
            if self.thinking_index is None:
                self.thinking_index = self.next_index
                self.next_index += 1
                frames.append(
                    _frame(ContentBlockStartEvent(index=self.thinking_index, content_block=ThinkingBlock(thinking="")))
                )
            frames.append(
                _frame(ContentBlockDeltaEvent(index=self.thinking_index, delta=ThinkingDeltaPayload(thinking=event.text)))
            )
            return frames
        if isinstance(event, TextDelta) and event.index == 0:
            delta = self.held + event.text
            if self.text_index is None and not _shows_text(delta):
                self.held = delta
                return []
            self.held = ""
            frames = []
            if self.text_index is None:
                frames += self._close_thinking()
                self.text_index = self.next_index
                self.next_index += 1
                frames.append(_frame(ContentBlockStartEvent(index=self.text_index, content_block=TextBlock(text=""))))
            if delta:
                frames.append(_frame(ContentBlockDeltaEvent(index=self.text_index, delta=TextDeltaPayload(text=delta))))
            return frames
        if isinstance(event, ChoiceEnd) and event.index == 0:
            frames = self._close_thinking()
            if self.text_index is not None:
                frames.append(_frame(ContentBlockStopEvent(index=self.text_index)))
            for _, call_id, call in self.accumulated.choice(0).calls:
                index = self.next_index
                self.next_index += 1
                arguments = json.dumps(tool_input(call.arguments))
                frames += [
                    _frame(ContentBlockStartEvent(index=index, content_block=_tool_block(self.prepared, call_id, call, empty=True))),
                    _frame(ContentBlockDeltaEvent(index=index, delta=InputJSONDeltaPayload(partial_json=arguments))),
                    _frame(ContentBlockStopEvent(index=index)),
                ]
            return frames
        return []

    def finish(self) -> list[bytes]:
        message = message_body(self.prepared, self.accumulated)
        usage = message.usage
        return [
            _frame(
                MessageDeltaEvent(
                    delta=MessageDeltaPayload(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence),
                    usage=MessageDeltaUsage(
                        output_tokens=usage.output_tokens,
                        input_tokens=usage.input_tokens,
                        cache_creation_input_tokens=usage.cache_creation_input_tokens,
                        cache_read_input_tokens=usage.cache_read_input_tokens,
                    ),
                )
            ),
            _frame(MessageStopEvent()),
        ]

    def fail(self, error: APIError) -> list[bytes]:
        return [event_frame("error", json.dumps(anthropic_error_body(error.status, error.message)))]
