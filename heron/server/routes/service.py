"""Service routes: /health, /metrics, /version and the index at / (the playground for browsers)."""

from __future__ import annotations

import functools
import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

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
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
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
    "GET /playground/",
]


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    context = context_of(request)
    if context.drain.draining:
        return error_response(context.drain.refusal())
    registry = context.registry
    if registry is None:
        return error_response(APIError(503, "The model is still loading.", code="loading"))
    # A data-parallel engine runs while any replica serves; its dead replicas are listed below.
    dead = [m.name for m in registry.models if not m.engine.is_running]
    if dead:
        return error_response(APIError(503, f"The engine for {', '.join(dead)} has stopped.", code="engine_dead"))
    stats = [m.engine.stats for m in registry.models if m.kind == "generate"]
    body = {
        "status": "ok",
        "running": sum(s.num_running for s in stats),
        "waiting": sum(s.num_waiting for s in stats),
        "requests": sum(s.num_requests for s in stats),
        "kv_cache_usage": max((s.kv_cache_usage for s in stats), default=0.0),
    }
    replicas = []
    for model in registry.models:
        for replica in getattr(model.engine, "replica_stats", None) or ():
            entry = {
                "index": replica.index,
                "status": "ok" if replica.alive else "dead",
                "running": replica.stats.num_running,
                "waiting": replica.stats.num_waiting,
                "kv_cache_usage": replica.stats.kv_cache_usage,
            }
            if len(registry.models) > 1:
                entry["model"] = model.name
            if not replica.alive:
                entry["error"] = replica.death
            replicas.append(entry)
    if replicas:
        # 200 while some replica serves (requests are routed around the dead ones); say which are dead.
        body["replicas"] = replicas
        body["dead_replicas"] = [r["index"] for r in replicas if r["status"] == "dead"]
    return JSONResponse(body)


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    # Open like /health (vLLM's /metrics needs no key either); engine gauges are read now.
    return Response(context_of(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


# The chat playground (heron/server/static: plain HTML/CSS/JS shipped as package data), mounted at
# PLAYGROUND_PATH by create_app and shown at / to browsers.
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PLAYGROUND_PATH = "/playground"


def _quality(accept: str, media_type: str) -> float:
    """The q-value `accept` gives `media_type`, from its most specific matching range (RFC 9110)."""
    main_type = media_type.split("/", 1)[0]
    best, quality = -1, 0.0
    for item in accept.split(","):
        media_range, *parameters = item.split(";")
        media_range = media_range.strip().lower()
        if media_range == media_type:
            specificity = 2
        elif media_range == f"{main_type}/*":
            specificity = 1
        elif media_range == "*/*":
            specificity = 0
        else:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if specificity > best:
            best, quality = specificity, q
    return quality


def prefers_html(accept: str) -> bool:
    """True when the Accept header ranks text/html above application/json, as browsers send it
    (`text/html,...,*/*;q=0.8`). `*/*`, no header, or JSON first: the JSON index."""
    return _quality(accept, "text/html") > _quality(accept, "application/json")


@functools.cache
def _playground_html() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@router.get("/", response_model=None)
async def root(request: Request) -> Response:
    # Vary: the same URL answers HTML or JSON, so caches must key on Accept.
    headers = {"Vary": "Accept"}
    if prefers_html(request.headers.get("accept", "")):
        # index.html names its assets relatively (so any static server can serve the folder);
        # at / they are found under the mount.
        base = f'<base href="{html.escape(request.scope.get("root_path", ""))}{PLAYGROUND_PATH}/">'
        return HTMLResponse(_playground_html().replace("<head>", f"<head>\n{base}", 1), headers=headers)
    return JSONResponse({"name": "heron", "version": __version__, "endpoints": ENDPOINTS}, headers=headers)
