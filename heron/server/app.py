"""The ASGI application: routes, request parsing, auth, admission, streaming and error envelopes.

`create_app(settings, registry)` builds the FastAPI app. With no registry, the app loads the model
the settings (or `HERON_*` variables) name when it starts, which is how `heron.server.app:app` runs
under a user's own `uvicorn`/`gunicorn`. Bodies are parsed here rather than by FastAPI so that every
mistake gets OpenAI's 400 envelope (FastAPI would answer 422 in its own shape); each route then hands
the validated request to `serving_chat` / `serving_completions`.

Per request: `X-Request-Id` (the caller's or a new one) is echoed and logged; a body over the limit
gets 413 before it is read; with API keys configured, `/v1/*`, `/tokenize` and `/detokenize` need a
bearer key; beyond `max_num_seqs + max_queue_len` requests in flight, new ones get 429; a client that
goes away (streaming or not) aborts its engine request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from urllib.parse import quote
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from heron import __version__
from heron.server.errors import APIError, bad_request, shorten, unknown_fields_error, validation_error
from heron.server.metrics import (
    METRICS_CONTENT_TYPE,
    Metrics,
    MetricsMiddleware,
    RequestRecord,
    format_request_log,
    one_line_json,
)
from heron.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    tokenize_request_adapter,
)
from heron.server.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from heron.server.registry import ModelRegistry, ServedModel, load_served_models
from heron.server.serving_chat import chat_response, chat_stream, compile_chat, prepare_chat, render_chat_prompt
from heron.server.serving_common import SSE_DONE, SSE_HEADERS, merge_streams, request_error_from, sse_error
from heron.server.serving_completions import (
    compile_completion,
    completion_response,
    completion_stream,
    encode_prompt_text,
    num_completion_prompts,
    prepare_completion,
)
from heron.server.limits import Drain, RateLimiter
from heron.server.settings import ServerSettings
from heron.server.timeouts import BodyDeadline, BodyTimeout
from heron.server.tool_calls import ToolPlan

logger = logging.getLogger("heron.server")

IGNORED_FIELDS_HEADER = "X-Heron-Ignored-Fields"
REQUEST_ID_HEADER = "X-Request-Id"
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# Bodies larger than this are decoded and validated on a worker thread, not on the event loop.
_INLINE_PARSE_BYTES = 64 * 1024
_LOGGED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})  # one log line each
# Paths still answered while draining: /health (which then says 503 itself) and monitoring.
_DURING_DRAIN = frozenset({"/health", "/metrics"})


# ---------------------------------------------------------------------------------------------
# ASGI middleware: request id and body limit (pure ASGI, so streaming responses pass untouched)
# ---------------------------------------------------------------------------------------------


class _CORSMiddleware(CORSMiddleware):
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
            await _send_error(send_with_id, self.drain.refusal())
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send_with_id)
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
            await self._too_large(send_with_id)
        except BodyTimeout:
            # The rest of the body may still be on its way: the connection cannot carry another request.
            error = APIError(
                408,
                f"The request body did not arrive within {self.body_timeout:g} s.",
                code="request_timeout",
                headers={"Connection": "close"},
            )
            await _send_error(send_with_id, error)
        finally:
            self.drain.in_progress -= 1

    async def _too_large(self, send: Callable) -> None:
        error = APIError(
            413,
            f"The request body is larger than this server accepts ({self.max_body_bytes} bytes).",
            code="request_too_large",
        )
        await _send_error(send, error)


async def _send_error(send: Callable, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Helpers used by the routes
# ---------------------------------------------------------------------------------------------


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _authorize(request: Request, keys: list[str]) -> None:
    if not keys or not request.url.path.startswith(_PROTECTED_PREFIXES):
        return
    token = _bearer_token(request)
    if token is None:
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    # Compare against every key in constant time so timing does not reveal a prefix.
    if not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "*" * len(token)
        raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")


async def _read_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(
                415,
                f"Unsupported content type '{shorten(media, 64)}': send the request body as JSON with "
                "'Content-Type: application/json'.",
                code="unsupported_media_type",
            )
    return await request.body()


def _decode_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON, not UTF-8, or an integer too long to read; RecursionError: nesting
        # deeper than the parser goes.
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else shorten(str(exc), 200)
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The server expects a JSON payload, but what was "
            f"sent was not valid JSON ({reason}).",
            code="invalid_json",
        ) from exc
    # JSON may escape half a surrogate pair (\ud800): valid JSON, but no Unicode text; the
    # tokenizer cannot encode it. Only bodies that escape a surrogate at all are walked.
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise APIError(
            400,
            "The request body contains a lone UTF-16 surrogate escape (e.g. \\ud800), which is not valid Unicode text.",
            code="invalid_json",
        )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _validate(body: Any, model_class: type[BaseModel] | Any, strict_fields: bool) -> tuple[Any, list[str]]:
    if not isinstance(body, dict):
        raise APIError(
            400,
            f"The request body must be a JSON object, not {type(body).__name__ if body is not None else 'null'}.",
            code="invalid_type",
        )
    try:
        parsed = model_class.model_validate(body) if isinstance(model_class, type) else model_class.validate_python(body)
    except ValidationError as exc:
        raise validation_error(exc, body) from exc
    unknown = parsed.unknown_fields()
    if unknown and strict_fields:
        raise unknown_fields_error(unknown)
    return parsed, unknown


class _Admission:
    """Counts the sequences in flight (prompts x n, or best_of): what the engine runs and queues.
    Past the bound, new requests are told to come back later; one that could never fit is a 400."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inflight = 0

    def acquire(self, sequences: int) -> Callable[[], None]:
        """Take `sequences` slots or raise; returns the release (safe to call more than once)."""
        if sequences > self.limit:
            raise APIError(
                400,
                f"This request needs {sequences} sequences (prompts x n, or best_of), more than this server runs "
                f"and queues at once ({self.limit}: --max-num-seqs plus --max-queue-len).",
                code="too_many_sequences",
            )
        if self.inflight + sequences > self.limit:
            raise APIError(
                429,
                f"The server is at capacity ({self.inflight} sequences in flight); retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        self.inflight += sequences
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= sequences

        return release


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
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
                yield b": keep-alive\n\n"
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


def _json(model: BaseModel, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _headers(unknown: list[str]) -> dict[str, str]:
    # Field names are the caller's: percent-encode anything a header value cannot carry (non-ASCII,
    # control characters such as CR/LF).
    return {IGNORED_FIELDS_HEADER: ", ".join(quote(name, safe="[]._-$@") for name in unknown)} if unknown else {}


# ---------------------------------------------------------------------------------------------
# OpenAPI: request bodies are parsed by hand, so describe them to /docs explicitly
# ---------------------------------------------------------------------------------------------


def _install_openapi(app: FastAPI, bodies: dict[str, tuple[Any, Any]]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})

        def ref(model: Any, mode: str) -> dict[str, Any]:
            if isinstance(model, type) and issubclass(model, BaseModel):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                name = model.__name__
            else:  # a TypeAdapter
                js = model.json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                name = "TokenizeRequest"
            components.update(js.pop("$defs", {}))
            components[name] = js
            return {"$ref": f"#/components/schemas/{name}"}

        for path, (request_model, response_model) in bodies.items():
            operation = schema["paths"][path]["post"]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(request_model, "validation")}},
            }
            if response_model is not None:
                operation["responses"]["200"] = {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": ref(response_model, "serialization")}},
                }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
def _with_request_id(error: APIError, request: Request) -> APIError:
    """A 500 names the request id, so an operator can find its traceback in the log."""
    request_id = getattr(request.state, "request_id", None)
    if request_id is None or request_id in error.message:
        return error
    return APIError(
        error.status, f"{error.message} (request id {request_id})", param=error.param, code=error.code,
        type=error.type, headers=error.headers,
    )


def _tenant(request: Request, keys: list[str]) -> str | None:
    """The configured API key a request was authorized with, as a digest; None without keys, where
    a bearer token is anyone's invention and names nobody."""
    token = _bearer_token(request) if keys else None
    return None if token is None else "key:" + hashlib.sha256(token.encode()).hexdigest()


def _client_key(request: Request, keys: list[str]) -> str:
    """Whom a rate limit counts against: the request's API key, else (no keys configured) the
    client's address, so that a made-up token per request gets no fresh allowance."""
    return _tenant(request, keys) or "addr:" + (request.client.host if request.client else "-")


def _cache_salt(request: Request, settings: ServerSettings, asked: str | None) -> str | None:
    """The prefix-cache salt of a request: with API keys configured, its key's (so one tenant's
    cached prompt blocks never answer another's: `cached_tokens` would tell what others sent),
    unless --share-prefix-cache-across-keys; and the request's own `cache_salt` (vLLM's field)."""
    parts = []
    tenant = None if settings.share_prefix_cache_across_keys else _tenant(request, settings.api_key)
    if tenant is not None:
        parts.append(tenant)
    if asked:
        parts.append("req:" + asked)
    return "\n".join(parts) or None


def _timed_out(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request did not finish within this server's time limit of {seconds:g} s (--request-timeout); "
        "it was stopped. Lower max_tokens or retry later.",
        code="request_timeout",
        type="timeout_error",
    )


async def _deadline(work: Awaitable[Any], seconds: float) -> Any:
    """Await `work`, stopping it (and so its engine requests) after `seconds`; 0 = no limit."""
    if seconds <= 0:
        return await work
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise _timed_out(seconds) from None


async def _with_deadline(frames: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    """Forward SSE frames until `seconds` have passed; then an error event and [DONE], and the
    stream (with its engine requests) is closed."""
    iterator = frames.__aiter__()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            try:
                if seconds <= 0:
                    frame = await iterator.__anext__()
                else:
                    frame = await asyncio.wait_for(iterator.__anext__(), max(deadline - loop.time(), 0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                yield sse_error(_timed_out(seconds))
                yield SSE_DONE
                return
            yield frame
    finally:
        await iterator.aclose()


# The app
# ---------------------------------------------------------------------------------------------


def create_app(settings: ServerSettings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal registry
        owned = registry is None
        if owned:
            registry = await asyncio.to_thread(load_served_models, settings, False)
        app.state.registry = registry
        try:
            yield
        finally:
            if owned:
                await registry.shutdown()

    app = FastAPI(
        title="Heron",
        version=__version__,
        description="OpenAI-compatible API served by Heron's own engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    admission = _Admission(settings.max_num_seqs + settings.max_queue_len)
    metrics = app.state.metrics = Metrics(lambda: app.state.registry)
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
    # Flipped by the server runner on SIGTERM (heron.server.runner).
    drain = app.state.drain = Drain()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request_record(request).error = exc.code or exc.type
        if exc.status == 500:
            exc = _with_request_id(exc, request)
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        else:
            message = str(exc.detail)
        error = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if drain.draining:
            # Shutting down: a request caught half way (its compile pool or engine just closed)
            # is turned away like any other during the drain, not reported as our bug.
            return _error_response(drain.refusal())
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = APIError(500, f"Internal server error ({type(exc).__name__}).", code="internal_error")
        return _error_response(_with_request_id(error, request))

    def models() -> ModelRegistry:
        return app.state.registry

    def rate_limit(request: Request, tokens: int) -> None:
        if limiter.enabled:
            limiter.admit(_client_key(request, settings.api_key), tokens)

    def rate_check(request: Request) -> None:
        """The cheap part of the rate limit, before any tokenizing or compiling is spent on it."""
        if limiter.enabled:
            limiter.check_requests(_client_key(request, settings.api_key))

    def request_record(request: Request) -> RequestRecord:
        # MetricsMiddleware puts one in every request's state; a stand-in keeps a route working without.
        record = getattr(request.state, "request_record", None)
        return record if record is not None else RequestRecord()

    def log_request(scope: dict, route: str, status: int, record: RequestRecord) -> None:
        """One line per generation / embedding request once it has ended (MetricsMiddleware calls it)."""
        if settings.disable_log_requests or route not in _LOGGED_ROUTES:
            return
        client = scope.get("client")
        fields = record.log_fields(
            scope.get("state", {}).get("request_id"), status, client[0] if client else None, time.monotonic()
        )
        logger.info("%s", format_request_log(fields, settings.log_format))

    def decode_and_validate(raw: bytes, model_class: Any, record: RequestRecord) -> tuple[Any, list[str]]:
        body = _decode_json(raw)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            record.model = body["model"][:256]  # for the log line, even if invalid
        return _validate(body, model_class, settings.strict_fields)

    async def parse(request: Request, model_class: Any) -> tuple[Any, list[str]]:
        _authorize(request, settings.api_key)
        raw = await _read_body(request)
        record = request_record(request)
        if len(raw) > _INLINE_PARSE_BYTES:
            # Decoding and validating grows with the body (100,000 prompts, a 10 MB message): off
            # the event loop, so /health and every other request keep being answered meanwhile.
            parsed, unknown = await asyncio.to_thread(decode_and_validate, raw, model_class, record)
        else:
            parsed, unknown = decode_and_validate(raw, model_class, record)
        if unknown:
            shown = one_line_json([shorten(name, 64) for name in unknown[:20]])
            logger.info("request id=%s ignored unknown fields: %s", request.state.request_id, shown)
        return parsed, unknown

    def generation_model(name: str) -> ServedModel:
        model = models().get(name)
        if model.kind != "generate":
            raise bad_request(
                f"The model `{name}` is an embedding model: it serves /v1/embeddings, not text generation.",
                param="model",
                code="wrong_model_type",
            )
        return model

    # ------------------------------------------------------------------- generation routes

    @app.post("/v1/chat/completions", tags=["OpenAI"])
    async def create_chat_completion(request: Request) -> Response:
        record = request_record(request)
        parsed, unknown = await parse(request, ChatCompletionRequest)
        record.model, record.stream = parsed.model, bool(parsed.stream)
        if settings.log_prompts:
            record.prompt = [m.model_dump(exclude_none=True) for m in parsed.messages]
        model = generation_model(parsed.model)
        # Cheap refusals first: nothing is rendered, tokenized or compiled for a request refused.
        rate_check(request)
        release = admission.acquire(parsed.n or 1)
        try:
            # Rendering the template and tokenizing grow with the messages: off the event loop.
            prepared = await asyncio.to_thread(prepare_chat, parsed, model, settings.seed)
            rate_limit(request, len(prepared.prompt_token_ids) + prepared.params.max_tokens * prepared.params.n)
            await _until_disconnect(request, compile_chat(prepared))
            headers = _headers(unknown)
            record.finish_reasons, record.num_choices = prepared.finish_reasons, prepared.params.n
            outputs = metrics.track(
                model.engine.generate(
                    prepared.prompt_token_ids,
                    prepared.params,
                    prepared.response_id,
                    cache_salt=_cache_salt(request, settings, parsed.cache_salt),
                    grammar=prepared.grammar,
                ),
                record, model.name, len(prepared.prompt_token_ids), prepared.params.n,
            )
            if parsed.stream:
                frames = _with_deadline(chat_stream(prepared, outputs), settings.request_timeout)
                response = _stream(_with_keepalive(frames, settings.sse_keepalive), headers, release)
                release = None  # the stream holds the slots until it ends
                return response
            try:
                response = await _until_disconnect(
                    request, _deadline(chat_response(prepared, outputs), settings.request_timeout)
                )
            except Exception as exc:
                raise request_error_from(exc) from exc
            finally:
                await outputs.aclose()
        finally:
            if release is not None:
                release()
        record.num_prompt_tokens = response.usage.prompt_tokens
        record.num_completion_tokens = response.usage.completion_tokens
        return _json(response, headers)

    @app.post("/v1/completions", tags=["OpenAI"])
    async def create_completion(request: Request) -> Response:
        record = request_record(request)
        parsed, unknown = await parse(request, CompletionRequest)
        record.model, record.stream = parsed.model, bool(parsed.stream)
        if settings.log_prompts:
            record.prompt = parsed.prompt
        model = generation_model(parsed.model)
        num_prompts = num_completion_prompts(parsed)
        if num_prompts > settings.max_prompts_per_request:
            raise bad_request(
                f"This request has {num_prompts} prompts; this server takes at most "
                f"{settings.max_prompts_per_request} per request (--max-prompts-per-request).",
                param="prompt",
                code="too_many_prompts",
            )
        rate_check(request)
        release = admission.acquire(num_prompts * (parsed.best_of or parsed.n or 1))
        try:
            prepared = await asyncio.to_thread(prepare_completion, parsed, model, settings.seed)
            total_prompt_tokens = sum(len(p.token_ids) for p in prepared.prompts)
            if total_prompt_tokens > settings.max_prompt_tokens_per_request:
                raise bad_request(
                    f"This request's prompts have {total_prompt_tokens} tokens in all; this server takes at most "
                    f"{settings.max_prompt_tokens_per_request} per request (--max-prompt-tokens-per-request).",
                    param="prompt",
                    code="too_many_prompt_tokens",
                )
            rate_limit(
                request,
                sum(len(p.token_ids) + prepared.params.max_tokens * prepared.params.n for p in prepared.prompts),
            )
            await _until_disconnect(request, compile_completion(prepared))
            headers = _headers(unknown)
            record.finish_reasons, record.num_choices = prepared.finish_reasons, len(prepared.prompts) * prepared.n
            salt = _cache_salt(request, settings, parsed.cache_salt)
            streams = [
                metrics.track(
                    model.engine.generate(
                        prompt.token_ids,
                        prepared.params,
                        f"{prepared.response_id}-{i}",
                        cache_salt=salt,
                        grammar=prepared.grammar,
                    ),
                    record, model.name, len(prompt.token_ids), prepared.params.n,
                )
                for i, prompt in enumerate(prepared.prompts)
            ]
            merged = merge_streams(streams)
            if parsed.stream:
                frames = _with_deadline(completion_stream(prepared, merged), settings.request_timeout)
                response = _stream(_with_keepalive(frames, settings.sse_keepalive), headers, release)
                release = None
                return response
            try:
                response = await _until_disconnect(
                    request, _deadline(completion_response(prepared, merged), settings.request_timeout)
                )
            except Exception as exc:
                raise request_error_from(exc) from exc
            finally:
                await merged.aclose()
        finally:
            if release is not None:
                release()
        record.num_prompt_tokens = response.usage.prompt_tokens
        record.num_completion_tokens = response.usage.completion_tokens
        return _json(response, headers)

    def _stream(frames: AsyncIterator[bytes], headers: dict[str, str], release: Callable[[], None]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for frame in frames:
                    yield frame
            finally:
                release()
                await frames.aclose()

        return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    # ------------------------------------------------------------------- embeddings

    @app.post("/v1/embeddings", tags=["OpenAI"])
    async def create_embedding(request: Request) -> Response:
        record = request_record(request)
        parsed, unknown = await parse(request, EmbeddingRequest)
        record.model = parsed.model
        if settings.log_prompts:
            record.prompt = parsed.input
        model = models().get(parsed.model)
        if model.kind != "embed":
            raise bad_request(
                f"The model `{parsed.model}` generates text: it does not serve /v1/embeddings.",
                param="model",
                code="wrong_model_type",
            )
        # The engine validates ids, lengths and dimensions (EmbeddingInputError -> 400 below).
        texts, token_ids = parsed.inputs()
        rate_check(request)
        release = admission.acquire(1)
        try:
            try:
                if texts is not None:
                    token_ids = await model.engine.tokenize(texts, parsed.truncate_prompt_tokens)
                rate_limit(request, sum(len(ids) for ids in token_ids))
                outputs = await _until_disconnect(
                    request,
                    model.engine.embed(
                        token_ids, parsed.truncate_prompt_tokens, parsed.dimensions, request.state.request_id
                    ),
                )
            except ValueError as exc:
                # EmbeddingInputError names the field at fault; other ValueErrors concern the input.
                message = str(exc)
                message = message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
                raise bad_request(message, param=getattr(exc, "param", None) or "input") from exc
            except Exception as exc:
                raise request_error_from(exc) from exc
        finally:
            release()
        data = []
        for index, output in enumerate(outputs):
            if parsed.encoding_format == "base64":
                vector: list[float] | str = base64.b64encode(
                    np.asarray(output.embedding, dtype="<f4").tobytes()
                ).decode("ascii")
            else:
                vector = output.embedding
            data.append(Embedding.model_construct(embedding=vector, index=index))
        prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
        response = EmbeddingResponse(
            data=data, model=parsed.model, usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        )
        record.num_prompt_tokens, record.extra["inputs"] = prompt_tokens, len(outputs)
        return _json(response, _headers(unknown))

    # ------------------------------------------------------------------- models, tokenizer

    @app.get("/v1/models", tags=["OpenAI"])
    async def list_models(request: Request) -> JSONResponse:
        _authorize(request, settings.api_key)
        cards = [_card(m, name) for m in models().models for name in m.names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}", tags=["OpenAI"])
    async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
        _authorize(request, settings.api_key)
        model = models().get(model_id)
        return JSONResponse(_card(model, model_id).model_dump())

    @app.post("/tokenize", tags=["Heron"])
    async def tokenize(request: Request) -> JSONResponse:
        parsed, unknown = await parse(request, tokenize_request_adapter)
        model = models().get(parsed.model)

        def work() -> TokenizeResponse:
            if isinstance(parsed, TokenizeChatRequest):
                tools = None
                if parsed.tools:
                    # The prompt a chat request with these tools (tool_choice "auto") would get.
                    tools = ToolPlan.auto(
                        [tool.model_dump(exclude_none=True) for tool in parsed.tools], model.tool_call_parser
                    )
                prompt = render_chat_prompt(
                    model,
                    parsed.messages,
                    add_generation_prompt=parsed.add_generation_prompt and not parsed.continue_final_message,
                    continue_final_message=parsed.continue_final_message,
                    chat_template_kwargs=parsed.chat_template_kwargs,
                    tools=tools,
                )
                tokens = model.tokenizer.encode_rendered(prompt, add_special_tokens=parsed.add_special_tokens)
            else:
                tokens = encode_prompt_text(model, parsed.prompt, parsed.add_special_tokens)
            # Only the prompt form has vLLM's `return_token_strs`.
            want_strs = isinstance(parsed, TokenizeCompletionRequest) and parsed.return_token_strs
            return TokenizeResponse(
                count=len(tokens),
                max_model_len=model.max_model_len,
                tokens=tokens,
                token_strs=model.tokenizer.convert_ids_to_tokens(tokens) if want_strs else None,
            )

        # Rendering and tokenizing grow with the input: off the event loop.
        response = await asyncio.to_thread(work)
        return JSONResponse(response.model_dump(), headers=_headers(unknown))

    @app.post("/detokenize", tags=["Heron"])
    async def detokenize(request: Request) -> JSONResponse:
        parsed, unknown = await parse(request, DetokenizeRequest)
        model = models().get(parsed.model)
        for i, token_id in enumerate(parsed.tokens):
            if token_id >= model.vocab_size:
                raise bad_request(
                    f"Invalid token id {token_id}: token ids must be below the vocabulary size {model.vocab_size}.",
                    param=f"tokens[{i}]",
                )
        text = model.tokenizer.decode(parsed.tokens, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump(), headers=_headers(unknown))

    # ------------------------------------------------------------------- service routes

    @app.get("/health", tags=["Heron"])
    async def health() -> JSONResponse:
        if drain.draining:
            return _error_response(drain.refusal())
        registry = models()
        if registry is None:
            return _error_response(APIError(503, "The model is still loading.", code="loading"))
        dead = [m.name for m in registry.models if not m.engine.is_running]
        if dead:
            return _error_response(APIError(503, f"The engine for {', '.join(dead)} has stopped.", code="engine_dead"))
        stats = [m.engine.stats for m in registry.models if m.kind == "generate"]
        return JSONResponse(
            {
                "status": "ok",
                "running": sum(s.num_running for s in stats),
                "waiting": sum(s.num_waiting for s in stats),
                "requests": sum(s.num_requests for s in stats),
                "kv_cache_usage": max((s.kv_cache_usage for s in stats), default=0.0),
            }
        )

    @app.get("/metrics", tags=["Heron"])
    async def prometheus_metrics() -> Response:
        # Open like /health (vLLM's /metrics needs no key either); engine gauges are read now.
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/version", tags=["Heron"])
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/", tags=["Heron"])
    async def root() -> dict[str, Any]:
        return {
            "name": "heron",
            "version": __version__,
            "endpoints": [
                "POST /v1/chat/completions",
                "POST /v1/completions",
                "POST /v1/embeddings",
                "GET /v1/models",
                "GET /v1/models/{model}",
                "POST /tokenize",
                "POST /detokenize",
                "GET /health",
                "GET /metrics",
                "GET /version",
                "GET /docs",
                "GET /openapi.json",
            ],
        }

    _install_openapi(
        app,
        {
            "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
            "/v1/completions": (CompletionRequest, CompletionResponse),
            "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse),
            "/tokenize": (tokenize_request_adapter, TokenizeResponse),
            "/detokenize": (DetokenizeRequest, DetokenizeResponse),
        },
    )

    if settings.allowed_origins:
        app.add_middleware(
            _CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, IGNORED_FIELDS_HEADER],
        )
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_request_body_bytes, drain=drain, body_timeout=settings.body_timeout
    )
    # Outermost, so that it also counts (and logs) what the middlewares inside it refuse.
    app.add_middleware(MetricsMiddleware, metrics=metrics, on_end=log_request)
    return app


def _card(model: ServedModel, name: str) -> ModelCard:
    return ModelCard(id=name, root=model.loaded.source, max_model_len=model.max_model_len)


def __getattr__(name: str) -> Any:
    # `uvicorn heron.server.app:app`: build the app from HERON_* variables on first access, so
    # importing this module stays cheap.
    if name == "app":
        app = create_app(ServerSettings.from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
