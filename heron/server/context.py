"""What every route shares: body parsing, auth, admission, rate limits, and the generation pipeline.

`ServerContext` (one per app, on `app.state.context`; routes get it with `context_of(request)`)
holds the settings, the model registry, admission control, the rate limiter, metrics and the drain
flag. Bodies are parsed here rather than by FastAPI so that every mistake gets OpenAI's 400
envelope (FastAPI would answer 422 in its own shape), and big bodies are parsed off the event loop.

`ServerContext.answer()` is the one place a generation answer is sent: streamed through
heron/server/sse.py, or collected into the accumulator and returned as JSON, with its admission
slots released and its token counts recorded either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from heron.server.errors import APIError, bad_request, shorten, unknown_fields_error, validation_error
from heron.server.limits import Drain, RateLimiter
from heron.server.metrics import Metrics, RequestRecord, one_line_json
from heron.server.middleware import IGNORED_FIELDS_HEADER
from heron.server.registry import ModelRegistry, ServedModel
from heron.server.responses_store import open_response_store
from heron.server.settings import ServerSettings
from heron.server.sse import StreamWriter, collect, stream_response

logger = logging.getLogger("heron.server")

# /rerank, /v2/rerank and /score: vLLM's aliases of /v1/rerank and /v1/score, held to the same keys.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/rerank", "/v2/", "/score")
# Bodies larger than this are decoded and validated on a worker thread, not on the event loop.
_INLINE_PARSE_BYTES = 64 * 1024


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _bearer_token(request: Request) -> str | None:
    """The API key a request presents: `Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`
    (the bearer token wins when both are sent)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def authorize(request: Request, keys: list[str]) -> None:
    if not keys or not request.url.path.startswith(_PROTECTED_PREFIXES):
        return
    token = _bearer_token(request)
    if token is None:
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or an x-api-key header.",
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


class Admission:
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


def json_response(model: BaseModel, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def ignored_fields_headers(unknown: list[str]) -> dict[str, str]:
    # Field names are the caller's: percent-encode anything a header value cannot carry (non-ASCII,
    # control characters such as CR/LF).
    return {IGNORED_FIELDS_HEADER: ", ".join(quote(name, safe="[]._-$@") for name in unknown)} if unknown else {}


def with_request_id(error: APIError, request: Request) -> APIError:
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



def request_record(request: Request) -> RequestRecord:
    # MetricsMiddleware puts one in every request's state; a stand-in keeps a route working without.
    record = getattr(request.state, "request_record", None)
    return record if record is not None else RequestRecord()


class ServerContext:
    """The state behind every route of one app."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None) -> None:
        self.settings = settings
        self.registry = registry  # None until the lifespan has loaded the models
        self.admission = Admission(settings.max_num_seqs + settings.max_queue_len)
        self.metrics = Metrics(lambda: self.registry)
        self.limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        # Flipped by the server runner on SIGTERM (heron.server.runner).
        self.drain = Drain()
        # Stored /v1/responses (store: true), for previous_response_id and GET.
        self.responses = open_response_store(settings.responses_store, settings.responses_store_max)
        self.logger = logger

    def close(self) -> None:
        self.responses.close()

    # ------------------------------------------------------------------- requests

    def authorize(self, request: Request) -> None:
        authorize(request, self.settings.api_key)

    def _decode_and_validate(self, raw: bytes, model_class: Any, record: RequestRecord) -> tuple[Any, list[str]]:
        body = _decode_json(raw)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            record.model = body["model"][:256]  # for the log line, even if invalid
        return _validate(body, model_class, self.settings.strict_fields)

    async def parse(self, request: Request, model_class: Any) -> tuple[Any, list[str]]:
        """The validated body and the unknown fields it carried (after auth)."""
        self.authorize(request)
        raw = await _read_body(request)
        record = request_record(request)
        if len(raw) > _INLINE_PARSE_BYTES:
            # Decoding and validating grows with the body (100,000 prompts, a 10 MB message): off
            # the event loop, so /health and every other request keep being answered meanwhile.
            parsed, unknown = await asyncio.to_thread(self._decode_and_validate, raw, model_class, record)
        else:
            parsed, unknown = self._decode_and_validate(raw, model_class, record)
        if unknown:
            shown = one_line_json([shorten(name, 64) for name in unknown[:20]])
            logger.info("request id=%s ignored unknown fields: %s", request.state.request_id, shown)
        return parsed, unknown

    def model(self, name: str, kind: str | None = None) -> ServedModel:
        """The served model `name`; with `kind`, a 400 if it is the other kind."""
        model = self.registry.get(name)
        # A cross-encoder (kind "score") serves only /v1/rerank and /v1/score.
        reranker = f"The model `{name}` is a cross-encoder (reranker): it serves /v1/rerank and /v1/score"
        if kind == "generate" and model.kind != "generate":
            raise bad_request(
                f"{reranker}, not text generation." if model.kind == "score" else
                f"The model `{name}` is an embedding model: it serves /v1/embeddings, not text generation.",
                param="model",
                code="wrong_model_type",
            )
        if kind == "embed" and model.kind != "embed":
            raise bad_request(
                f"{reranker}, not /v1/embeddings." if model.kind == "score" else
                f"The model `{name}` generates text: it does not serve /v1/embeddings.",
                param="model",
                code="wrong_model_type",
            )
        return model

    def rate_check(self, request: Request) -> None:
        """The cheap part of the rate limit, before any tokenizing or compiling is spent on it."""
        if self.limiter.enabled:
            self.limiter.check_requests(_client_key(request, self.settings.api_key))

    def rate_limit(self, request: Request, tokens: int) -> None:
        if self.limiter.enabled:
            self.limiter.admit(_client_key(request, self.settings.api_key), tokens)

    def cache_salt(self, request: Request, asked: str | None) -> str | None:
        return _cache_salt(request, self.settings, asked)

    @contextlib.contextmanager
    def admitted(self, sequences: int) -> Iterator[Callable[[], None]]:
        """Admission slots for `sequences`; the release is handed to `answer()`, and runs here
        if the route fails before it gets there."""
        release = self.admission.acquire(sequences)
        try:
            yield release
        except BaseException:
            release()
            raise

    # ------------------------------------------------------------------- answers

    async def answer(
        self,
        request: Request,
        *,
        stream: bool,
        events: AsyncIterator[Any],
        accumulator: Any,
        writer: Callable[[], StreamWriter],
        body: Callable[[], BaseModel],
        release: Callable[[], None],
        headers: dict[str, str],
    ) -> Response:
        """Send one generation answer. A stream takes over `release` (it holds its admission slots
        until it ends); a collected answer releases them here. `writer` and `body` are called only
        for the form that is sent."""
        settings = self.settings
        if stream:
            return stream_response(
                events, accumulator, writer(),
                timeout=settings.request_timeout, keepalive=settings.sse_keepalive, headers=headers, release=release,
            )
        try:
            await collect(request, events, accumulator, timeout=settings.request_timeout)
        finally:
            release()
        response = body()
        usage = getattr(response, "usage", None)
        if usage is not None:
            record = request_record(request)
            record.num_prompt_tokens, record.num_completion_tokens = _usage_counts(usage)
        return json_response(response, headers)


def _usage_counts(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a chat/completions usage or a Responses usage."""
    if hasattr(usage, "prompt_tokens"):
        return usage.prompt_tokens, usage.completion_tokens
    return usage.input_tokens, usage.output_tokens


def context_of(request: Request) -> ServerContext:
    return request.app.state.context
