"""POST /v1/responses: a Responses request answered by the chat path, in the Responses shapes.

`prepare_response()` turns the request (plus the conversation of its `previous_response_id`) into a
chat request with `to_chat_request` and prepares that with `prepare_chat`, so templates, tool plans
and grammars are chat's own. The engine's outputs become chat's events (`chat_events`), folded by
the same accumulator; `response_body()` builds the Response from it, and `ResponsesStreamWriter`
renders the events as OpenAI's named stream events, ending with the same `response_body()`.

Output layout, streamed or not: one `reasoning` item (if the model's reasoning parser took any
thinking out of the text), one `message` item (if the model wrote any text that is not just
whitespace), then one `function_call` item per tool call. The thinking comes before the answer,
and calls are streamed when the choice ends, so the stream's order is the collected response's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from heron.server.accumulator import Accumulator, Choice, ChoiceEnd, ReasoningDelta, TextDelta
from heron.server.errors import APIError, validation_error
from heron.server.protocol import ChatCompletionTokenLogprob
from heron.server.protocol.common import now_unix
from heron.server.protocol.responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputText,
    OutputTextLogprob,
    OutputTextTopLogprob,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCreateRequest,
    ResponseError,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseObject,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ReasoningText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    input_items,
    make_id,
    to_chat_request,
)
from heron.server.registry import ServedModel
from heron.server.serving_chat import PreparedChat, prepare_chat
from heron.server.serving_common import TokenText, chat_logprobs
from heron.server.sse import event_frame


@dataclass
class PreparedResponse:
    request: ResponseCreateRequest
    chat: PreparedChat
    history: list[dict[str, Any]]  # the previous_response_id chain's conversation
    input_items: list[dict[str, Any]]  # this request's input, as stored items
    response_id: str = field(default_factory=lambda: make_id("resp"))
    message_id: str = field(default_factory=lambda: make_id("msg"))
    reasoning_id: str = field(default_factory=lambda: make_id("rs"))
    created_at: int = field(default_factory=now_unix)
    # Tool-call id (the chat call id, which is the Responses call_id) -> its item id.
    _item_ids: dict[str, str] = field(default_factory=dict)

    def function_call_item_id(self, call_id: str) -> str:
        item_id = self._item_ids.get(call_id)
        if item_id is None:
            item_id = self._item_ids[call_id] = make_id("fc")
        return item_id

    def response(self, **fields: Any) -> ResponseObject:
        return ResponseObject.for_request(self.request, id=self.response_id, created_at=self.created_at, **fields)


def prepare_response(
    request: ResponseCreateRequest, model: ServedModel, default_seed: int | None, history: list[dict[str, Any]]
) -> PreparedResponse:
    """Everything that can fail before a byte is sent (a 400 names the Responses field)."""
    items = input_items(request)
    try:
        chat_request = to_chat_request(request, history)
    except ValidationError as exc:
        raise validation_error(exc, request.model_dump()) from exc
    try:
        chat = prepare_chat(chat_request, model, default_seed)
    except APIError as exc:
        if exc.param == "messages":
            raise APIError(exc.status, exc.message.replace("messages", "input"), param="input", code=exc.code) from exc
        raise
    return PreparedResponse(request, chat, history, items)


# ---------------------------------------------------------------------------------------------
# Building the response from the accumulated events
# ---------------------------------------------------------------------------------------------


def _output_logprobs(entries: list[ChatCompletionTokenLogprob]) -> list[OutputTextLogprob]:
    return [
        OutputTextLogprob(
            token=entry.token,
            logprob=entry.logprob,
            bytes=entry.bytes or [],
            top_logprobs=[
                OutputTextTopLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes or [])
                for top in entry.top_logprobs
            ],
        )
        for entry in entries
    ]


def _logprobs(prepared: PreparedResponse, text: TokenText, entries: list) -> list[OutputTextLogprob]:
    top_n = prepared.chat.top_logprobs
    if top_n is None or not entries:
        return []
    return _output_logprobs(chat_logprobs(entries, text, top_n))


def _shows_message(text: str) -> bool:
    return bool(text.strip())


def _status(finish_reason: str | None) -> tuple[str, IncompleteDetails | None]:
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    return "completed", None


def _usage(accumulated: Accumulator) -> ResponseUsage:
    usage = accumulated.usage()
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _message_item(prepared: PreparedResponse, text: str, logprobs: list, status: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=prepared.message_id, status=status, content=[OutputText(text=text, logprobs=logprobs)]
    )


def _reasoning_item(prepared: PreparedResponse, text: str, status: str) -> ResponseReasoningItem:
    return ResponseReasoningItem(id=prepared.reasoning_id, status=status, content=[ReasoningText(text=text)])


def _reasoning_status(choice: Choice, status: str) -> str:
    """A reasoning item is complete once an answer followed it; otherwise it ends as the response does."""
    return "completed" if _shows_message(choice.text) or choice.calls else status


def _call_item(prepared: PreparedResponse, call_id: str, call: Any, status: str = "completed") -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=prepared.function_call_item_id(call_id),
        call_id=call_id,
        name=call.name,
        arguments=call.arguments if status == "completed" else "",
        status=status,
    )


def response_body(prepared: PreparedResponse, accumulated: Accumulator) -> ResponseObject:
    """The finished Response, from the same events a stream sends."""
    choice = accumulated.choice(0)
    status, incomplete = _status(choice.finish_reason)
    output: list[Any] = []
    if choice.reasoning:
        output.append(_reasoning_item(prepared, choice.reasoning, _reasoning_status(choice, status)))
    if _shows_message(choice.text):
        text = TokenText(prepared.chat.model.tokenizer)
        output.append(_message_item(prepared, choice.text, _logprobs(prepared, text, choice.logprobs), status))
    output.extend(_call_item(prepared, call_id, call) for _, call_id, call in choice.calls)
    return prepared.response(
        status=status,
        completed_at=now_unix() if status == "completed" else None,
        incomplete_details=incomplete,
        output=output,
        usage=_usage(accumulated),
    )


def conversation_after(prepared: PreparedResponse, response: ResponseObject) -> list[dict[str, Any]]:
    """What a response continuing this one sees: the chain so far, this input, this output."""
    return [*prepared.history, *prepared.input_items, *(item.model_dump() for item in response.output)]


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class ResponsesStreamWriter:
    """OpenAI's Responses stream: response.created and .in_progress; for the thinking,
    output_item.added, content_part.added, reasoning_text.delta..., reasoning_text.done,
    content_part.done, output_item.done (closed when the message opens or the choice ends);
    for the message, output_item.added, content_part.added, output_text.delta..., output_text.done,
    content_part.done, output_item.done; for each call, output_item.added,
    function_call_arguments.delta and .done, output_item.done; then response.completed (or
    .incomplete) carrying `response_body()`. Every event has the next `sequence_number`.
    `on_done` receives the final response (to store it) before the last event is sent."""

    def __init__(self, prepared: PreparedResponse, accumulated: Accumulator, on_done: Any = None) -> None:
        self.prepared = prepared
        self.accumulated = accumulated
        self.on_done = on_done
        self.sequence = 0
        self.text = TokenText(prepared.chat.model.tokenizer)
        self.message_open = False
        # Leading whitespace (and its logprobs), sent once the message has something to show.
        self.held = ""
        self.held_logprobs: list[OutputTextLogprob] = []
        self.sent_text: list[str] = []
        self.sent_logprobs: list[OutputTextLogprob] = []
        self.next_output_index = 0
        self.message_index = 0  # 1 when a reasoning item comes first
        self.reasoning_open = False
        self.reasoning_sent: list[str] = []

    def _event(self, event_class: type, **fields: Any) -> bytes:
        event = event_class(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event_frame(event.type, event.model_dump_json())

    def start(self) -> list[bytes]:
        created = self.prepared.response(status="in_progress")
        return [
            self._event(ResponseCreatedEvent, response=created),
            self._event(ResponseInProgressEvent, response=created),
        ]

    def _open_reasoning(self) -> list[bytes]:
        self.reasoning_open = True
        self.message_index = self.next_output_index = 1
        prepared = self.prepared
        item = ResponseReasoningItem(id=prepared.reasoning_id, status="in_progress", content=[])
        return [
            self._event(ResponseOutputItemAddedEvent, output_index=0, item=item),
            self._event(
                ResponseContentPartAddedEvent, item_id=prepared.reasoning_id, output_index=0, content_index=0,
                part=ReasoningText(text=""),
            ),
        ]

    def _close_reasoning(self, status: str) -> list[bytes]:
        if not self.reasoning_open:
            return []
        self.reasoning_open = False
        text = "".join(self.reasoning_sent)
        ids = {"item_id": self.prepared.reasoning_id, "output_index": 0, "content_index": 0}
        return [
            self._event(ResponseReasoningTextDoneEvent, text=text, **ids),
            self._event(ResponseContentPartDoneEvent, part=ReasoningText(text=text), **ids),
            self._event(
                ResponseOutputItemDoneEvent, output_index=0, item=_reasoning_item(self.prepared, text, status)
            ),
        ]

    def _open_message(self) -> list[bytes]:
        frames = self._close_reasoning("completed")
        self.message_open = True
        index = self.message_index
        self.next_output_index = index + 1
        prepared = self.prepared
        item = ResponseOutputMessage(id=prepared.message_id, status="in_progress", content=[])
        return [
            *frames,
            self._event(ResponseOutputItemAddedEvent, output_index=index, item=item),
            self._event(
                ResponseContentPartAddedEvent, item_id=prepared.message_id, output_index=index, content_index=0,
                part=OutputText(text=""),
            ),
        ]

    def _close_message(self, status: str) -> list[bytes]:
        if not self.message_open:
            return []
        self.message_open = False
        prepared = self.prepared
        text = "".join(self.sent_text)
        part = OutputText(text=text, logprobs=self.sent_logprobs)
        ids = {"item_id": prepared.message_id, "output_index": self.message_index, "content_index": 0}
        return [
            self._event(ResponseTextDoneEvent, text=text, logprobs=self.sent_logprobs, **ids),
            self._event(ResponseContentPartDoneEvent, part=part, **ids),
            self._event(
                ResponseOutputItemDoneEvent, output_index=self.message_index,
                item=_message_item(prepared, text, self.sent_logprobs, status),
            ),
        ]

    def write(self, event: Any) -> list[bytes]:
        if isinstance(event, ReasoningDelta):
            if not event.text or self.message_open:
                return []  # thinking after the answer began: kept in the collected body only
            frames = [] if self.reasoning_open else self._open_reasoning()
            self.reasoning_sent.append(event.text)
            frames.append(
                self._event(
                    ResponseReasoningTextDeltaEvent, item_id=self.prepared.reasoning_id, output_index=0,
                    content_index=0, delta=event.text,
                )
            )
            return frames
        if isinstance(event, TextDelta):
            frames: list[bytes] = []
            delta = self.held + event.text
            logprobs = self.held_logprobs + _logprobs(self.prepared, self.text, event.logprobs)
            if not self.message_open and not _shows_message(delta):
                self.held, self.held_logprobs = delta, logprobs
                return []
            self.held, self.held_logprobs = "", []
            if not self.message_open:
                frames += self._open_message()
            if not delta and not logprobs:
                return frames
            self.sent_text.append(delta)
            self.sent_logprobs.extend(logprobs)
            frames.append(
                self._event(
                    ResponseTextDeltaEvent, item_id=self.prepared.message_id, output_index=self.message_index,
                    content_index=0,
                    delta=delta, logprobs=logprobs,
                )
            )
            return frames
        if isinstance(event, ChoiceEnd):
            status, _ = _status(event.finish_reason)
            frames = self._close_reasoning(_reasoning_status(self.accumulated.choice(0), status))
            frames += self._close_message(status)
            for _, call_id, call in self.accumulated.choice(0).calls:
                index = self.next_output_index
                self.next_output_index += 1
                item_id = self.prepared.function_call_item_id(call_id)
                frames += [
                    self._event(
                        ResponseOutputItemAddedEvent, output_index=index,
                        item=_call_item(self.prepared, call_id, call, status="in_progress"),
                    ),
                    self._event(ResponseFunctionCallArgumentsDeltaEvent, item_id=item_id, output_index=index, delta=call.arguments),
                    self._event(
                        ResponseFunctionCallArgumentsDoneEvent, item_id=item_id, output_index=index, name=call.name,
                        arguments=call.arguments,
                    ),
                    self._event(ResponseOutputItemDoneEvent, output_index=index, item=_call_item(self.prepared, call_id, call)),
                ]
            return frames
        return []

    def finish(self) -> list[bytes]:
        response = response_body(self.prepared, self.accumulated)
        if self.on_done is not None:
            self.on_done(response)
        final = ResponseIncompleteEvent if response.status == "incomplete" else ResponseCompletedEvent
        return [self._event(final, response=response)]

    def fail(self, error: APIError) -> list[bytes]:
        failed = self.prepared.response(
            status="failed",
            error=ResponseError(code="server_error", message=error.message),
            usage=_usage(self.accumulated),
        )
        return [
            self._event(ResponseErrorEvent, code=error.code, message=error.message, param=error.param),
            self._event(ResponseFailedEvent, response=failed),
        ]
