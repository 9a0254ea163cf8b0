"""Service routes: /health, /metrics, /version and the index at /."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from heron import __version__
from heron.server.context import context_of, error_response
from heron.server.errors import APIError
from heron.server.metrics import METRICS_CONTENT_TYPE

router = APIRouter(tags=["Heron"])

ENDPOINTS = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/responses",
    "GET /v1/responses/{response_id}",
    "DELETE /v1/responses/{response_id}",
    "GET /v1/responses/{response_id}/input_items",
    "POST /v1/embeddings",
    "POST /v1/rerank",
    "POST /v1/score",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /tokenize",
    "POST /detokenize",
    "GET /health",
    "GET /metrics",
    "GET /version",
    "GET /docs",
    "GET /openapi.json",
]


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    context = context_of(request)
    if context.drain.draining:
        return error_response(context.drain.refusal())
    registry = context.registry
    if registry is None:
        return error_response(APIError(503, "The model is still loading.", code="loading"))
    dead = [m.name for m in registry.models if not m.engine.is_running]
    if dead:
        return error_response(APIError(503, f"The engine for {', '.join(dead)} has stopped.", code="engine_dead"))
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


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    # Open like /health (vLLM's /metrics needs no key either); engine gauges are read now.
    return Response(context_of(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/")
async def root() -> dict[str, Any]:
    return {"name": "heron", "version": __version__, "endpoints": ENDPOINTS}
