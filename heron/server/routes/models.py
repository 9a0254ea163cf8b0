"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from heron.server.context import context_of
from heron.server.protocol import ModelCard, ModelList
from heron.server.registry import ServedModel

router = APIRouter(tags=["OpenAI"])


def _card(model: ServedModel, name: str) -> ModelCard:
    card = ModelCard(id=name, root=model.loaded.source, max_model_len=model.max_model_len)
    if model.kind == "generate":
        card.sampling_defaults = dict(model.generation_defaults)
        card.sampling_defaults_source = model.generation_defaults_source
    return card


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    context = context_of(request)
    context.authorize(request)
    cards = [_card(m, name) for m in context.registry.models for name in m.names]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    context = context_of(request)
    context.authorize(request)
    return JSONResponse(_card(context.registry.get(model_id), model_id).model_dump())
