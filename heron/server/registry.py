"""The models one server serves: each with its names, engine, tokenizer and chat template.

`ServedModel` is everything a route needs to answer for one model; `ModelRegistry` resolves the
`model` field of a request (any served name or alias) to it, or raises the 404 OpenAI sends.
`load_served_models()` builds them from ServerSettings: the positional model, or with none the
bundled chat and embedding models, plus each `--model PATH[=NAMES]`,
as a generation model (engine core + AsyncEngine) or an embedding model (EmbeddingEngine + its
micro-batching async face), by what the loaded checkpoint is.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from heron import __version__
from heron.models.bundled import (
    DEFAULT_CHAT_MODEL_NAME,
    DEFAULT_EMBEDDING_MODEL_NAME,
    default_chat_model_path,
    default_embedding_model_path,
)
from heron.distributed.parallel_state import check_tp_layout
from heron.parsers import detect_reasoning_parser, detect_tool_parser, get_reasoning_parser, get_tool_parser
from heron.server.errors import model_not_found
from heron.server.generation_config import sampling_defaults
from heron.server.settings import ServerSettings

logger = logging.getLogger("heron.server")

@dataclass
class ServedModel:
    names: list[str]  # every name a request may use
    kind: str  # "generate" | "embed" | "score" (a cross-encoder: /v1/rerank and /v1/score only)
    loaded: object  # heron.models.loader.LoadedModel
    engine: object  # heron.engine.async_engine.AsyncEngine
    tokenizer: object
    chat_template: object | None  # heron.models.chat_template.ChatTemplate
    max_model_len: int
    vocab_size: int
    system_fingerprint: str
    generation_defaults: dict = field(default_factory=dict)  # sampling values for fields a request omits
    generation_defaults_source: str = ""  # where they come from (--generation-config)
    fim_tokens: tuple[int, int, int] | None = None  # prefix, suffix, middle ids when the vocab has them
    memory_bytes: int = 0  # weights, plus the KV cache for generation models
    tool_call_parser: str = "hermes"  # a heron.parsers name: how tool calls are read from the text
    reasoning_parser: str | None = None  # a heron.parsers reasoning format, None: no think blocks
    # Whose text may spell control tokens: "none", "completions" (prompt strings) or "all" (chat
    # message text too); see --special-tokens-in-prompts.
    special_tokens_in_prompts: str = "completions"

    @property
    def name(self) -> str:
        return self.names[0]

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token's spelling covers: a text longer than max_model_len times
        this (twice, for normalizers that merge characters) cannot fit, tokenized or not."""
        spellings = self.tokenizer.convert_ids_to_tokens(range(self.vocab_size))
        return max(1, max(len(s) for s in spellings))


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
            # vLLM's /tokenize makes `model` optional; without it, the first model served (the
            # positional one, or the bundled chat model) answers.
            return self.models[0]
        model = self._by_name.get(name)
        if model is None:
            raise model_not_found(name)
        return model

    async def shutdown(self) -> None:
        for model in self.models:
            # A DataParallelEngine stops its replicas' threads, then their processes, itself.
            await model.engine.shutdown()
            if model.kind == "generate" and not getattr(model.engine, "owns_cores", False):
                # The engine thread has ended: nothing steps the core any more.
                model.engine.core.shutdown()

    def close_now(self) -> None:
        """Stop every engine thread from synchronous code (start-up failed half way)."""
        import asyncio

        asyncio.run(self.shutdown())


def _default_name(source: str) -> str:
    path = Path(source)
    bundled = {str(default_chat_model_path()): DEFAULT_CHAT_MODEL_NAME}
    try:
        bundled[str(default_embedding_model_path())] = DEFAULT_EMBEDDING_MODEL_NAME
    except FileNotFoundError:
        pass
    if str(path) in bundled:
        return bundled[str(path)]
    return path.stem if path.suffix == ".gguf" else path.name


def _fim_tokens(tokenizer) -> tuple[int, int, int] | None:
    # StarCoder-style fill-in-the-middle tokens (SmolLM, StarCoder, Qwen2.5-Coder's <|fim_*|>).
    for names in (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")):
        ids = [tokenizer.token_to_id(name) for name in names]
        if all(i is not None for i in ids):
            return ids[0], ids[1], ids[2]
    return None


def _weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _digest(loaded) -> str:
    return "fp_" + hashlib.sha256(f"{__version__}:{loaded.source}:{loaded.dtype}".encode()).hexdigest()[:10]


def parse_model_spec(spec: str) -> tuple[str, list[str]]:
    """'path/to/model.gguf=name,alias' -> ('path/to/model.gguf', ['name', 'alias'])."""
    path, sep, names = spec.rpartition("=") if "=" in spec else (spec, "", "")
    names_list = [n.strip() for n in names.split(",") if n.strip()] if sep else []
    if sep and not names_list:
        raise ValueError(f"--model {spec!r}: give at least one name after '='")
    return path, names_list


def build_core(loaded, settings: ServerSettings, executor=None):
    """The EngineCore a generation model runs on, configured from ServerSettings: the server's own
    (one replica) and each data-parallel replica's (heron.distributed.replica) are built here alike.
    `executor`: what runs its steps (heron.engine.executor.factory.make_executor); default one worker
    on `loaded`'s weights in this process."""
    from heron.config import CacheConfig, SchedulerConfig
    from heron.engine.core import EngineCore

    return EngineCore(
        loaded,
        CacheConfig(kv_cache_memory_bytes=settings.kv_cache_memory, enable_prefix_caching=settings.enable_prefix_caching),
        SchedulerConfig.for_device(
            loaded.device,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
        ),
        settings.max_model_len,
        grammar_limits=grammar_limits(settings),
        executor=executor,
    )


def grammar_limits(settings: ServerSettings):
    from heron.structured import GrammarLimits

    return GrammarLimits(
        max_bytes=settings.max_grammar_bytes,
        max_schema_depth=settings.max_schema_depth,
        max_schema_nodes=settings.max_schema_nodes,
        max_grammar_rules=settings.max_grammar_rules,
        max_grammar_depth=settings.max_grammar_depth,
        max_regex_bytes=settings.max_regex_bytes,
        max_object_properties=settings.max_object_properties,
        max_grammar_symbols=settings.max_grammar_symbols,
    )


def serve_generation(loaded, names: list[str], settings: ServerSettings) -> ServedModel:
    """Wrap a loaded decoder in an engine core and its AsyncEngine (started); with
    --data-parallel-size N > 1, in N replica processes behind a DataParallelEngine instead (`loaded`
    is then a description without weights: each replica loads its own)."""
    from heron.engine.async_engine import AsyncEngine
    from heron.models.chat_template import ChatTemplate

    tokenizer = loaded.tokenizer
    if settings.chat_template is not None:
        template = ChatTemplate.from_file(settings.chat_template, special_tokens=tokenizer.special_tokens)
    elif loaded.chat_template:
        template = ChatTemplate(loaded.chat_template, special_tokens=tokenizer.special_tokens)
    else:
        template = None
    parser = settings.tool_call_parser or detect_tool_parser(template.source if template is not None else None)
    get_tool_parser(parser)  # an unknown name fails at start-up, not on the first tool request
    reasoning = settings.reasoning_parser
    if reasoning is None:
        reasoning = detect_reasoning_parser(template.source if template is not None else None)
    elif reasoning == "none":
        reasoning = None
    if reasoning is not None:
        get_reasoning_parser(reasoning)  # likewise
    defaults = sampling_defaults(settings.generation_config, loaded)
    arch = loaded.arch_config
    # A split that cannot work fails here, before any replica or rank process starts.
    check_tp_layout(settings.tensor_parallel_size, arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size)
    if settings.data_parallel_size > 1:
        from heron.distributed.dp_engine import DataParallelEngine

        engine = DataParallelEngine.launch(loaded, settings)  # replicas built and started
        max_model_len = engine.max_model_len
        memory_bytes = engine.memory_bytes
        grammar_compiler = engine.grammar_compiler
    else:
        from heron.engine.executor.factory import make_executor

        executor = make_executor(
            loaded, settings.tensor_parallel_size, settings.distributed_executor_backend, settings.ray_address
        )
        core = build_core(loaded, settings, executor)
        max_model_len = core.max_model_len
        weights = _weight_bytes(loaded.model) if loaded.model is not None else 0
        memory_bytes = weights + core.runtime.kv_cache_bytes
        grammar_compiler = core.grammar_compiler
        engine = AsyncEngine(
            core,
            grammar_workers=settings.grammar_compile_workers,
            grammar_queue=settings.max_grammar_queue,
            grammar_timeout=settings.grammar_compile_timeout,
        )
    try:
        grammar_compiler.prepare()
    except Exception as exc:  # noqa: BLE001 - text generation still works; structured requests will say why
        logger.warning("structured outputs cannot use this tokenizer: %s", exc)
    engine.start()
    return ServedModel(
        names=names or [_default_name(loaded.source)],
        kind="generate",
        loaded=loaded,
        engine=engine,
        tokenizer=tokenizer,
        chat_template=template,
        max_model_len=max_model_len,
        vocab_size=loaded.arch_config.vocab_size,
        system_fingerprint=_digest(loaded),
        generation_defaults=dict(defaults.values),
        generation_defaults_source=defaults.source,
        fim_tokens=_fim_tokens(tokenizer),
        memory_bytes=memory_bytes,
        tool_call_parser=parser,
        reasoning_parser=reasoning,
        special_tokens_in_prompts=settings.special_tokens_in_prompts,
    )


def serve_embedding(loaded, names: list[str], settings: ServerSettings) -> ServedModel:
    """Wrap a loaded encoder in an EmbeddingEngine and its micro-batching AsyncEmbeddingEngine:
    an embedding model (kind "embed"), or a cross-encoder that only scores pairs ("score")."""
    from heron.engine.embedding import AsyncEmbeddingEngine, EmbeddingEngine

    engine = EmbeddingEngine(loaded)
    async_engine = AsyncEmbeddingEngine(engine)
    async_engine.start()
    return ServedModel(
        names=names or [_default_name(loaded.source)],
        kind="score" if loaded.is_cross_encoder else "embed",
        loaded=loaded,
        engine=async_engine,
        tokenizer=loaded.tokenizer,
        chat_template=None,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        system_fingerprint=_digest(loaded),
        memory_bytes=_weight_bytes(loaded.model),
    )


def _weights_elsewhere(settings: ServerSettings) -> bool:
    return (
        settings.data_parallel_size > 1
        or settings.tensor_parallel_size > 1
        or settings.distributed_executor_backend == "ray"
    )


def load_served_models(settings: ServerSettings, progress: bool = True) -> ModelRegistry:
    """The positional model (or the two bundled ones) and every `--model`, loaded and started."""
    from heron.env import env_settings
    from heron.models.loader import load_model

    env_settings()  # the environment switches, read now: a bad value fails start-up on any device

    # The positional model (default: the bundled chat model) always; the bundled embedding model
    # when no positional model is named; then every --model.
    specs: list[tuple[str | None, list[str]]] = [(settings.model, list(settings.served_model_name))]
    if settings.model is None:
        specs.append((str(default_embedding_model_path()), []))
    specs.extend(parse_model_spec(spec) for spec in settings.models)
    registry = ModelRegistry()
    try:
        for path, names in specs:
            # With replicas or tensor-parallel ranks the model runs in worker processes, which load
            # the weights themselves: this process keeps the config and tokenizer only.
            loaded = load_model(path, dtype=settings.dtype, device=settings.device, progress=progress,
                                with_weights=not _weights_elsewhere(settings))
            served = (serve_embedding if loaded.is_embedding else serve_generation)(loaded, names, settings)
            registry.add(served)
    except BaseException:
        registry.close_now()
        raise
    return registry
