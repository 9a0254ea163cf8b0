"""Server-sent events, and the life of a generation response on the wire, streamed or collected.

Everything that turns a route's events into bytes on the connection is here, once: `data:` frames
(chat and completions) and named `event:` frames (the Responses API), keep-alive comments, the
request deadline (--request-timeout), error frames after the first byte, cancel-on-disconnect, and
the hand-back of admission slots when a stream ends.

A route hands over an async iterator of events (see heron/server/accumulator.py), the accumulator
that folds them, and a `StreamWriter` that renders them. `stream_response` drives the three for a
streamed request; `collect` drives events into the accumulator for a non-streamed one. Both read
the same events into the same accumulator, so a streamed and a collected answer cannot disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from heron.server.errors import APIError
from heron.server.protocol import ErrorResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
SSE_DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def data_frame(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def event_frame(event: str, payload: str) -> bytes:
    """A named event, as the Responses API streams them (`event:` names the `type` in the data)."""
    return f"event: {event}\ndata: {payload}\n\n".encode()


def error_frame(error: APIError) -> bytes:
    """OpenAI's error envelope as one data frame: how chat and completions streams report a
    failure once the status line has gone out."""
    return data_frame(ErrorResponse(error=error.detail()).model_dump_json())


def request_error_from(exc: BaseException) -> APIError:
    """An exception raised while generating -> the APIError to send (in the body or the stream)."""
    from heron.engine.errors import EngineDeadError, RequestFailedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailedError):
        # The engine ended this request alone (the others carry on); 500s get the request id added.
        message = exc.message[:1].upper() + exc.message[1:]
        return APIError(exc.status, message if message.endswith(".") else message + ".", param=exc.param, code=exc.code)
    if isinstance(exc, ValueError):
        from heron.server.errors import bad_request

        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine has stopped; the server cannot serve requests.", code="engine_dead")
    return APIError(500, f"Internal error while generating: {type(exc).__name__}", code="internal_error")


# ---------------------------------------------------------------------------------------------
# Deadlines and disconnects
# ---------------------------------------------------------------------------------------------


def timed_out(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request did not finish within this server's time limit of {seconds:g} s (--request-timeout); "
        "it was stopped. Lower max_tokens or retry later.",
        code="request_timeout",
        type="timeout_error",
    )


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _within(events: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """`events` until `seconds` have passed since the first was asked for; then `timed_out`.
    0 = no limit. Closing this closes `events` (and so aborts its engine requests)."""
    iterator = events.__aiter__()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            try:
                if seconds <= 0:
                    event = await iterator.__anext__()
                else:
                    event = await asyncio.wait_for(iterator.__anext__(), max(deadline - loop.time(), 0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise timed_out(seconds) from None
            yield event
    finally:
        await iterator.aclose()


# ---------------------------------------------------------------------------------------------
# Driving events: streamed or collected
# ---------------------------------------------------------------------------------------------


class Accumulator(Protocol):
    def add(self, event: Any) -> None: ...


class StreamWriter(Protocol):
    """Renders one response's events as SSE frames."""

    def start(self) -> Iterable[bytes]:
        """Frames before the first event (chat's role deltas, response.created)."""

    def write(self, event: Any) -> Iterable[bytes]:
        """Frames for one event, after the accumulator has taken it."""

    def finish(self) -> Iterable[bytes]:
        """Frames after the last event (a usage chunk, `[DONE]`, response.completed)."""

    def fail(self, error: APIError) -> Iterable[bytes]:
        """Frames that report `error` once the stream has begun."""


async def _frames(events: AsyncIterator[Any], accumulator: Accumulator, writer: StreamWriter, seconds: float) -> AsyncIterator[bytes]:
    bounded = _within(events, seconds)
    try:
        for frame in writer.start():
            yield frame
        async for event in bounded:
            accumulator.add(event)
            for frame in writer.write(event):
                yield frame
        frames = list(writer.finish())
    except Exception as exc:  # after the first byte the status is sent: report in the stream
        frames = list(writer.fail(request_error_from(exc)))
    finally:
        # Leaving early (client gone) must abort the engine requests now, not when collected.
        await bounded.aclose()
    for frame in frames:
        yield frame


async def _with_keepalive(frames: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Forward SSE frames, adding a comment line whenever none came for `interval` seconds."""
    if interval <= 0:
        try:
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()
        return
    iterator = frames.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            try:
                frame = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield frame
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await iterator.aclose()


def stream_response(
    events: AsyncIterator[Any],
    accumulator: Accumulator,
    writer: StreamWriter,
    *,
    timeout: float,
    keepalive: float,
    headers: dict[str, str],
    release: Callable[[], None],
) -> StreamingResponse:
    """The streamed answer; `release` (the admission slots) runs when the stream ends, however."""
    frames = _with_keepalive(_frames(events, accumulator, writer, timeout), keepalive)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for frame in frames:
                yield frame
        finally:
            release()
            await frames.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def collect(request: Request, events: AsyncIterator[Any], accumulator: Accumulator, *, timeout: float) -> None:
    """Drain `events` into `accumulator` for a non-streamed answer: stopped by a disconnect (499)
    or the deadline (408); any failure comes out as the APIError to answer with."""
    bounded = _within(events, timeout)

    async def drain() -> None:
        async for event in bounded:
            accumulator.add(event)

    try:
        await until_disconnect(request, drain())
    except Exception as exc:
        raise request_error_from(exc) from exc
    finally:
        await bounded.aclose()
