"""The models one server serves: each with its names, engine, tokenizer and chat template.

`ServedModel` is everything a route needs to answer for one model; `ModelRegistry` resolves the
`model` field of a request (any served name or alias) to it, or raises the 404 OpenAI sends.
`load_generation_model()` builds a ServedModel from ServerSettings: load weights, build the engine
core, wrap it in an AsyncEngine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from heron import __version__
from heron.server.errors import model_not_found
from heron.server.settings import ServerSettings

logger = logging.getLogger("heron.server")

DEFAULT_CHAT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServedModel:
    names: list[str]  # the first is reported in responses
    kind: str  # "generate"
    loaded: object  # heron.models.loader.LoadedModel
    engine: object  # heron.engine.async_engine.AsyncEngine
    tokenizer: object
    chat_template: object | None  # heron.models.chat_template.ChatTemplate
    max_model_len: int
    vocab_size: int
    system_fingerprint: str
    generation_defaults: dict = field(default_factory=dict)
    fim_tokens: tuple[int, int, int] | None = None  # prefix, suffix, middle ids when the vocab has them

    @property
    def name(self) -> str:
        return self.names[0]


class ModelRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self.models: list[ServedModel] = []

    def add(self, model: ServedModel) -> None:
        for name in model.names:
            if name in self._by_name:
                raise ValueError(f"two models are served as {name!r}")
        for name in model.names:
            self._by_name[name] = model
        self.models.append(model)

    def get(self, name: str | None) -> ServedModel:
        if name is None:
            # vLLM's /tokenize makes `model` optional: one model means no ambiguity.
            if len(self.models) == 1:
                return self.models[0]
            raise model_not_found("")
        model = self._by_name.get(name)
        if model is None:
            raise model_not_found(name)
        return model

    async def shutdown(self) -> None:
        for model in self.models:
            await model.engine.shutdown()


def _default_name(source: str, bundled: bool) -> str:
    if bundled:
        return DEFAULT_CHAT_MODEL_NAME
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.name


def _fim_tokens(tokenizer) -> tuple[int, int, int] | None:
    # StarCoder-style fill-in-the-middle tokens (SmolLM, StarCoder, Qwen2.5-Coder's <|fim_*|>).
    for names in (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")):
        ids = [tokenizer.token_to_id(name) for name in names]
        if all(i is not None for i in ids):
            return ids[0], ids[1], ids[2]
    return None


def load_generation_model(settings: ServerSettings, progress: bool = True) -> ServedModel:
    """Load the model the settings name (or the bundled one) and start its engine thread."""
    from heron.config import CacheConfig, SchedulerConfig
    from heron.engine.async_engine import AsyncEngine
    from heron.engine.core import EngineCore
    from heron.models.chat_template import ChatTemplate
    from heron.models.loader import load_model

    loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device, progress=progress)
    if loaded.arch_config is None:
        raise ValueError(f"{loaded.source} is an embedding model; serve a text-generation model")
    core = EngineCore(
        loaded,
        CacheConfig(kv_cache_memory_bytes=settings.kv_cache_memory, enable_prefix_caching=settings.enable_prefix_caching),
        SchedulerConfig(settings.max_num_seqs, settings.max_num_batched_tokens),
        settings.max_model_len,
    )
    tokenizer = loaded.tokenizer
    if settings.chat_template is not None:
        template = ChatTemplate.from_file(settings.chat_template, special_tokens=tokenizer.special_tokens)
    elif loaded.chat_template:
        template = ChatTemplate(loaded.chat_template, special_tokens=tokenizer.special_tokens)
    else:
        template = None
    names = list(settings.served_model_name) or [_default_name(loaded.source, settings.model is None)]
    digest = hashlib.sha256(f"{__version__}:{loaded.source}:{loaded.dtype}".encode()).hexdigest()[:10]
    engine = AsyncEngine(core)
    engine.start()
    return ServedModel(
        names=names,
        kind="generate",
        loaded=loaded,
        engine=engine,
        tokenizer=tokenizer,
        chat_template=template,
        max_model_len=core.max_model_len,
        vocab_size=loaded.arch_config.vocab_size,
        system_fingerprint=f"fp_{digest}",
        generation_defaults=dict(loaded.generation.sampling),
        fim_tokens=_fim_tokens(tokenizer),
    )
