"""Deadlines for slow clients: request headers (in the HTTP protocol) and request bodies (in ASGI).

uvicorn bounds only idle keep-alive connections. A client that opens a connection and sends nothing,
or drips its headers a byte at a time, holds a socket (and a file descriptor) for as long as it
likes; so does one that sends headers and then a body too slowly. `header_timeout_protocol()` gives
uvicorn a protocol class that closes a connection whose request headers have not all arrived within
the deadline, counted from the connection's start or from the end of the previous response; a
steady trickle of bytes does not reset it. `BodyDeadline` bounds the time from the request's start
until its last body byte; the middleware that uses it answers 408 and closes the connection.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import TimerHandle
from collections.abc import Awaitable, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float = 0.0  # seconds; 0 = no deadline

    _header_timer: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers get their own deadline; until the first byte, the keep-alive
        # timeout (usually shorter) is what closes an idle connection.
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        if self.header_timeout > 0:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        # Only a connection between requests (or before its first) is closed: once headers are in,
        # the request is the body deadline's and the application's business.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.logger.debug("closing a connection that sent no complete request headers in %g s", self.header_timeout)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose request headers take over `seconds`."""
    return type("HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), {"header_timeout": float(seconds)})


class BodyTimeout(Exception):
    """The request body did not fully arrive within the body timeout."""


class BodyDeadline:
    """Wraps an ASGI `receive` so the request body must be complete `seconds` after the request began.

    Only body messages are bounded: once the last one is in, `receive` waits for a disconnect as
    long as the application likes (that is how a stream notices a client leaving).
    """

    def __init__(self, receive: Callable[[], Awaitable[dict]], seconds: float) -> None:
        self._receive = receive
        self._deadline = time.monotonic() + seconds if seconds > 0 else None
        self._body_done = False

    async def __call__(self) -> dict:
        if self._deadline is None or self._body_done:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BodyTimeout from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._body_done = True
        return message
