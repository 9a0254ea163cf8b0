"""ASGI middleware under every route: request ids, the body-size limit and body deadline, drain refusals, CORS.

Pure ASGI (not FastAPI dependencies), so that streamed responses pass through untouched and what
is refused here (413, 408, 503 while draining) never reaches a route.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable

from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from heron.server.errors import APIError
from heron.server.protocol.messages import anthropic_error_body
from heron.server.limits import Drain
from heron.server.timeouts import BodyDeadline, BodyTimeout

IGNORED_FIELDS_HEADER = "X-Heron-Ignored-Fields"
REQUEST_ID_HEADER = "X-Request-Id"
# Anthropic's Messages API: errors under these paths come in Anthropic's envelope, not OpenAI's.
ANTHROPIC_PREFIX = "/v1/messages"
# Paths still answered while draining: /health (which then says 503 itself) and monitoring.
_DURING_DRAIN = frozenset({"/health", "/metrics"})


class ErrorEnvelopeCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered in OpenAI's error envelope."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = response.body.decode(errors="replace") or "CORS preflight refused"
        error = APIError(response.status_code, f"{reason}.", code="cors_refused")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(error.body(), status_code=response.status_code, headers=headers)


class _BodyTooLarge(Exception):
    pass


# What a caller's X-Request-Id may be: it is echoed in a header and written into log lines, so no
# spaces, quotes, separators or control characters (UUIDs, ULIDs and `req_...` ids all pass).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+@~-]{1,128}")


def clean_request_id(given: str) -> str:
    """The caller's request id if it is a safe one, else a new id."""
    given = given.strip()
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: Callable, max_body_bytes: int, drain: Drain, body_timeout: float = 0.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = clean_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode("latin-1"))

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        if self.drain.draining and scope["path"] not in _DURING_DRAIN:
            await _send_error(send_with_id, self.drain.refusal(), scope["path"])
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send_with_id, scope["path"])
            return
        received = 0
        bounded_receive = BodyDeadline(receive, self.body_timeout)

        async def limited_receive() -> dict:
            nonlocal received
            message = await bounded_receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        # Counted until the response is fully sent (a stream too): what a drain waits for.
        self.drain.in_progress += 1
        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await self._too_large(send_with_id, scope["path"])
        except BodyTimeout:
            # The rest of the body may still be on its way: the connection cannot carry another request.
            error = APIError(
                408,
                f"The request body did not arrive within {self.body_timeout:g} s.",
                code="request_timeout",
                headers={"Connection": "close"},
            )
            await _send_error(send_with_id, error, scope["path"])
        finally:
            self.drain.in_progress -= 1

    async def _too_large(self, send: Callable, path: str) -> None:
        error = APIError(
            413,
            f"The request body is larger than this server accepts ({self.max_body_bytes} bytes).",
            code="request_too_large",
        )
        await _send_error(send, error, path)


def error_body(path: str, error: APIError) -> dict:
    """`error` in the envelope the path's API uses: Anthropic's under /v1/messages, else OpenAI's."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_body(error.status, error.message)
    return error.body()


async def _send_error(send: Callable, error: APIError, path: str) -> None:
    body = json.dumps(error_body(path, error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
