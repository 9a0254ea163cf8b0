"""The ASGI application: middleware, error handlers, and the routers of heron/server/routes.

`create_app(settings, registry)` builds the FastAPI app. With no registry, the app loads the model
the settings (or `HERON_*` variables) name when it starts, which is how `heron.server.app:app` runs
under a user's own `uvicorn`/`gunicorn`. Routes live in heron/server/routes (one file per endpoint
family) and share heron/server/context.py; streaming is heron/server/sse.py's.

Per request: `X-Request-Id` (the caller's or a new one) is echoed and logged; a body over the limit
gets 413 before it is read; with API keys configured, `/v1/*`, `/tokenize` and `/detokenize` need a
bearer key; beyond `max_num_seqs + max_queue_len` requests in flight, new ones get 429; a client that
goes away (streaming or not) aborts its engine request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from heron import __version__
from heron.server.context import ServerContext, error_response, request_record, with_request_id
from heron.server.errors import APIError, bad_request
from heron.server.metrics import MetricsMiddleware, RequestRecord, format_request_log
from heron.server.middleware import (
    ANTHROPIC_PREFIX,
    IGNORED_FIELDS_HEADER,
    REQUEST_ID_HEADER,
    ErrorEnvelopeCORSMiddleware,
    RequestContextMiddleware,
    clean_request_id,
    error_body,
)
from heron.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ResponseCreateRequest,
    ResponseObject,
    TokenizeResponse,
    tokenize_request_adapter,
)
from heron.server.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from heron.server.protocol.messages import CountTokensRequest, MessageObject, MessagesRequest, MessageTokensCount
from heron.server.protocol.rerank import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from heron.server.registry import ModelRegistry, load_served_models
from heron.server.routes import ROUTERS
from heron.server.routes.service import PLAYGROUND_PATH, STATIC_DIR
from heron.server.settings import ServerSettings

__all__ = ["create_app", "clean_request_id"]

logger = logging.getLogger("heron.server")

# One log line each once they end.
_LOGGED_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings", "/v1/rerank", "/v1/score"}
)
def _error_response(request: Request, error: APIError) -> JSONResponse:
    """`error` in the envelope the path's API uses (same status, same headers)."""
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=error.headers)
    return error_response(error)  # OpenAI's


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
# The app
# ---------------------------------------------------------------------------------------------


def create_app(settings: ServerSettings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    context = ServerContext(settings, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = context.registry is None
        if owned:
            context.registry = await asyncio.to_thread(load_served_models, settings, False)
        app.state.registry = context.registry
        try:
            yield
        finally:
            if owned:
                await context.registry.shutdown()
            context.close()

    app = FastAPI(
        title="Heron",
        version=__version__,
        description="OpenAI-compatible API served by Heron's own engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.context = context
    app.state.metrics = context.metrics
    app.state.drain = context.drain

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request_record(request).error = exc.code or exc.type
        if exc.status == 500:
            exc = with_request_id(exc, request)
        return _error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        else:
            message = str(exc.detail)
        error = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        body = error_body(request.url.path, error)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if context.drain.draining:
            # Shutting down: a request caught half way (its compile pool or engine just closed)
            # is turned away like any other during the drain, not reported as our bug.
            return _error_response(request, context.drain.refusal())
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = APIError(500, f"Internal server error ({type(exc).__name__}).", code="internal_error")
        return _error_response(request, with_request_id(error, request))

    def log_request(scope: dict, route: str, status: int, record: RequestRecord) -> None:
        """One line per generation / embedding request once it has ended (MetricsMiddleware calls it)."""
        if settings.disable_log_requests or route not in _LOGGED_ROUTES:
            return
        client = scope.get("client")
        fields = record.log_fields(
            scope.get("state", {}).get("request_id"), status, client[0] if client else None, time.monotonic()
        )
        logger.info("%s", format_request_log(fields, settings.log_format))

    for router in ROUTERS:
        app.include_router(router)
    app.mount(PLAYGROUND_PATH, StaticFiles(directory=STATIC_DIR, html=True), name="playground")  # shown at / too

    _install_openapi(
        app,
        {
            "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
            "/v1/completions": (CompletionRequest, CompletionResponse),
            "/v1/responses": (ResponseCreateRequest, ResponseObject),
            "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse),
            "/v1/messages": (MessagesRequest, MessageObject),
            "/v1/messages/count_tokens": (CountTokensRequest, MessageTokensCount),
            "/v1/rerank": (RerankRequest, RerankResponse),
            "/v1/score": (ScoreRequest, ScoreResponse),
            "/tokenize": (tokenize_request_adapter, TokenizeResponse),
            "/detokenize": (DetokenizeRequest, DetokenizeResponse),
        },
    )

    if settings.allowed_origins:
        app.add_middleware(
            ErrorEnvelopeCORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, IGNORED_FIELDS_HEADER],
        )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_request_body_bytes,
        drain=context.drain,
        body_timeout=settings.body_timeout,
    )
    # Outermost, so that it also counts (and logs) what the middlewares inside it refuse.
    app.add_middleware(MetricsMiddleware, metrics=context.metrics, on_end=log_request)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn heron.server.app:app`: build the app from HERON_* variables on first access, so
    # importing this module stays cheap.
    if name == "app":
        app = create_app(ServerSettings.from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
