"""ServerSettings: every `heron serve` option, from command-line flags or `HERON_*` environment variables.

One table (`OPTIONS`) defines each option once: its flag (vLLM's name where vLLM has the option, so
launch scripts carry over), its environment variable, type, default and help. `parse_args()` builds
the argparse parser from it, with environment values as defaults, so a flag beats the environment
and the environment beats the built-in default. `from_env()` is what the importable ASGI app uses
under a user's own `uvicorn`/`gunicorn` command.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from heron.config import DEFAULT_MAX_NUM_SEQS, CacheConfig, describe_batched_tokens_default

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'512MiB' -> 536870912, '2G' -> 2000000000, '1048576' -> 1048576."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 2GB)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    binary = "I" in unit
    letter = unit.replace("I", "").replace("B", "")
    scale = (1024 ** "KMGT".index(letter) * 1024 if letter else 1) if binary else _SIZE_UNITS[letter or ""]
    return int(number * scale)


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _log_format(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"not a log format: {text!r} (text or json)")
    return value


def _special_tokens_in_prompts(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ("none", "completions", "all"):
        raise argparse.ArgumentTypeError(f"not one of none, completions, all: {text!r}")
    return value


def _choice(*values: str):
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value not in values:
            raise argparse.ArgumentTypeError(f"not one of {', '.join(values)}: {text!r}")
        return value

    return parse


def _reasoning_parser(text: str) -> str:
    from heron.parsers import reasoning_parser_names

    value = str(text).strip().lower()
    known = [*reasoning_parser_names(), "none"]
    if value not in known:
        raise argparse.ArgumentTypeError(f"not a reasoning parser: {text!r} ({', '.join(known)})")
    return value


def _list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


@dataclass
class ServerSettings:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    models: list[str] = field(default_factory=list)  # more models: "PATH" or "PATH=name,alias"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: list[str] = field(default_factory=list)
    served_model_name: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None  # None: the device's default (heron.config)
    enable_prefix_caching: bool = CacheConfig.enable_prefix_caching
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_memory: int | None = None  # bytes
    # Scale-out (heron.distributed): ranks sharing each replica's model, replicas behind the router.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_policy: str = "prefix_aware"  # prefix_aware | least_loaded | round_robin
    data_parallel_load_bound: int = 4  # prefix affinity holds while a replica's load <= least + this
    distributed_executor_backend: str = "mp"  # mp (local processes) | ray (actors on a Ray cluster)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray instance
    seed: int | None = None
    chat_template: str | None = None
    # Sampling defaults for fields a request omits: auto (the model's own) | openai | a path.
    generation_config: str = "auto"
    tool_call_parser: str | None = None  # None: picked from the chat template
    reasoning_parser: str | None = None  # None: picked from the chat template; "none": no parser
    special_tokens_in_prompts: str = "completions"  # whose text may spell control tokens: none | completions | all
    # CORS: every origin by default, as vLLM and llama.cpp; --allowed-origins narrows it.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    max_request_body_bytes: int = 16 * 1024 * 1024
    max_queue_len: int = 256
    max_prompts_per_request: int = 2048  # /v1/completions prompts in one request
    max_prompt_tokens_per_request: int = 262_144  # their tokens, all prompts together
    share_prefix_cache_across_keys: bool = False
    # Structured outputs: caps on one spec (heron.structured.limits.GrammarLimits) and the compile pool.
    max_grammar_bytes: int = 128 * 1024
    max_schema_depth: int = 128
    max_schema_nodes: int = 5_000
    max_grammar_rules: int = 2_000
    max_grammar_depth: int = 128
    max_regex_bytes: int = 8 * 1024
    max_object_properties: int = 450
    max_grammar_symbols: int = 100_000
    grammar_compile_workers: int = 1
    max_grammar_queue: int = 16
    grammar_compile_timeout: float = 10.0
    rate_limit_rpm: int = 0  # per API key (or client address without keys); 0 = off
    rate_limit_tpm: int = 0
    request_timeout: float = 0.0  # seconds a generation may run; 0 = no limit
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0  # seconds a connection gets to send complete request headers; 0 = no limit
    body_timeout: float = 30.0  # seconds a request gets to send its whole body; 0 = no limit
    sse_keepalive: float = 0.0  # seconds; 0 = off
    # /v1/responses with store: kept in memory (None) or in an SQLite file that outlives a restart.
    responses_store: str | None = None
    responses_store_max: int = 10_000  # responses kept; the least recently used go first
    strict_fields: bool = False
    disable_log_requests: bool = False
    log_format: str = "text"  # the per-request log line: "text" (key=value) or "json"
    log_prompts: bool = False  # put the request's prompt / messages / input in its log line
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerSettings:
        return parse_args([], environ)


# name, flags, env, parser, help. `parser` turns a string (flag or env) into the value.
_OPTIONS: list[tuple[str, tuple[str, ...], str, Any, str]] = [
    ("host", ("--host",), "HERON_HOST", str, "address to bind (default 127.0.0.1)"),
    (
        "models",
        ("--model",),
        "HERON_MODELS",
        None,
        "serve another model beside the main one: PATH or PATH=name,alias (repeatable; env: semicolon-separated)",
    ),
    ("port", ("--port",), "HERON_PORT", int, "port to bind (default 8000)"),
    ("api_key", ("--api-key",), "HERON_API_KEY", None, "require this bearer key; repeat for several (env: comma-separated)"),
    (
        "served_model_name",
        ("--served-model-name",),
        "HERON_SERVED_MODEL_NAME",
        None,
        "name(s) clients may use for the model; responses echo the name a request used (env: comma-separated)",
    ),
    ("max_model_len", ("--max-model-len",), "HERON_MAX_MODEL_LEN", int, "context length cap (prompt + output tokens)"),
    (
        "max_num_seqs",
        ("--max-num-seqs",),
        "HERON_MAX_NUM_SEQS",
        int,
        f"most sequences decoded together (default {DEFAULT_MAX_NUM_SEQS})",
    ),
    (
        "max_num_batched_tokens",
        ("--max-num-batched-tokens",),
        "HERON_MAX_NUM_BATCHED_TOKENS",
        int,
        f"token budget of one engine step (prefill chunks + decodes; default {describe_batched_tokens_default()})",
    ),
    ("dtype", ("--dtype",), "HERON_DTYPE", str, "auto | float32 | bfloat16 | float16"),
    (
        "tensor_parallel_size",
        ("--tensor-parallel-size", "-tp"),
        "HERON_TENSOR_PARALLEL_SIZE",
        int,
        "split each replica's model over this many worker processes (attention heads, MLP and vocabulary "
        "sharded; all-reduce over gloo on CPU, NCCL on CUDA) (default 1: no split)",
    ),
    (
        "data_parallel_size",
        ("--data-parallel-size", "-dp"),
        "HERON_DATA_PARALLEL_SIZE",
        int,
        "engine replicas (processes) behind this one API server, each with its own KV and prefix cache (default 1)",
    ),
    (
        "data_parallel_policy",
        ("--data-parallel-policy",),
        "HERON_DATA_PARALLEL_POLICY",
        _choice("prefix_aware", "least_loaded", "round_robin"),
        "how a request picks its replica: prefix_aware (default: the replica holding the prompt's leading KV "
        "blocks, while its load stays within --data-parallel-load-bound of the least loaded) | least_loaded | "
        "round_robin",
    ),
    (
        "data_parallel_load_bound",
        ("--data-parallel-load-bound",),
        "HERON_DATA_PARALLEL_LOAD_BOUND",
        int,
        "requests (running + waiting) a prefix's replica may carry beyond the least loaded one before the "
        "router sends the prefix elsewhere (default 4)",
    ),
    (
        "distributed_executor_backend",
        ("--distributed-executor-backend",),
        "HERON_DISTRIBUTED_EXECUTOR_BACKEND",
        _choice("mp", "ray"),
        "where tensor-parallel workers and data-parallel replicas run: mp (default: processes on this "
        "machine) | ray (actors on a Ray cluster; pip install 'heron[ray]')",
    ),
    (
        "ray_address",
        ("--ray-address",),
        "HERON_RAY_ADDRESS",
        str,
        "the Ray cluster to join, e.g. 10.0.0.1:6379 or auto (default: $RAY_ADDRESS, else a Ray instance "
        "started for this server)",
    ),
    ("device", ("--device",), "HERON_DEVICE", str, "auto | cpu | cuda | cuda:N"),
    (
        "kv_cache_memory",
        ("--kv-cache-memory",),
        "HERON_KV_CACHE_MEMORY",
        parse_size,
        "KV cache budget in bytes, e.g. 512MiB (default: 1 GiB on CPU, half the free memory on CUDA)",
    ),
    ("seed", ("--seed",), "HERON_SEED", int, "default seed for requests that give none"),
    ("chat_template", ("--chat-template",), "HERON_CHAT_TEMPLATE", str, "Jinja chat template file overriding the model's"),
    ("generation_config", ("--generation-config",), "HERON_GENERATION_CONFIG", str,
     "sampling defaults for fields a request leaves out: auto (the model's generation_config.json; for the "
     "bundled model, Heron's shipped values; default), openai (OpenAI's), or a generation_config.json path"),
    (
        "tool_call_parser",
        ("--tool-call-parser",),
        "HERON_TOOL_CALL_PARSER",
        str,
        "how tool calls are read from the model's text: hermes | llama3_json | mistral | generic "
        "(default: picked from the chat template)",
    ),
    (
        "reasoning_parser",
        ("--reasoning-parser",),
        "HERON_REASONING_PARSER",
        _reasoning_parser,
        "how the model's thinking is split from its answer: qwen3 | deepseek_r1 | none (default: picked from the "
        "chat template; only templates that write <think> blocks get one)",
    ),
    (
        "special_tokens_in_prompts",
        ("--special-tokens-in-prompts",),
        "HERON_SPECIAL_TOKENS_IN_PROMPTS",
        _special_tokens_in_prompts,
        "where special tokens typed in client text are control tokens: completions (default: /v1/completions "
        "prompt strings, as in vLLM; chat message text stays plain text, so it cannot open a new turn) | all "
        "(chat message text too: the old behaviour) | none",
    ),
    (
        "allowed_origins",
        ("--allowed-origins",),
        "HERON_ALLOWED_ORIGINS",
        None,
        "CORS origins allowed to call the API (repeatable; env: comma-separated); default '*', any origin, "
        "without credentials",
    ),
    (
        "max_request_body_bytes",
        ("--max-request-body-bytes",),
        "HERON_MAX_REQUEST_BODY_BYTES",
        parse_size,
        "largest request body accepted (default 16MiB); larger gets 413",
    ),
    (
        "max_queue_len",
        ("--max-queue-len",),
        "HERON_MAX_QUEUE_LEN",
        int,
        "sequences (prompts x n) allowed to wait beyond --max-num-seqs before new requests get 429 (default 256)",
    ),
    (
        "max_prompts_per_request",
        ("--max-prompts-per-request",),
        "HERON_MAX_PROMPTS_PER_REQUEST",
        int,
        "most prompts one /v1/completions request may carry (default 2048); more gets 400",
    ),
    (
        "max_prompt_tokens_per_request",
        ("--max-prompt-tokens-per-request",),
        "HERON_MAX_PROMPT_TOKENS_PER_REQUEST",
        int,
        "most prompt tokens one /v1/completions request may carry, all prompts together (default 262144)",
    ),
    (
        "rate_limit_rpm",
        ("--rate-limit-rpm",),
        "HERON_RATE_LIMIT_RPM",
        int,
        "requests per minute allowed to each API key (each client address without keys); 0 = no limit",
    ),
    (
        "rate_limit_tpm",
        ("--rate-limit-tpm",),
        "HERON_RATE_LIMIT_TPM",
        int,
        "tokens per minute (prompt + max_tokens) allowed to each API key; 0 = no limit",
    ),
    (
        "request_timeout",
        ("--request-timeout",),
        "HERON_REQUEST_TIMEOUT",
        float,
        "seconds a completion may run before it is stopped with a timeout error (default 0 = no limit)",
    ),
    (
        "drain_timeout",
        ("--drain-timeout",),
        "HERON_DRAIN_TIMEOUT",
        float,
        "on SIGTERM, seconds in-flight requests get to finish before the server exits (default 30)",
    ),
    (
        "keep_alive_timeout",
        ("--keep-alive-timeout",),
        "HERON_KEEP_ALIVE_TIMEOUT",
        float,
        "seconds an idle keep-alive connection stays open before the server closes it (default 5)",
    ),
    (
        "header_timeout",
        ("--header-timeout",),
        "HERON_HEADER_TIMEOUT",
        float,
        "seconds a connection gets to send a request's complete headers, however slowly the bytes come, "
        "before it is closed (default 10; 0 = no limit)",
    ),
    (
        "body_timeout",
        ("--body-timeout",),
        "HERON_BODY_TIMEOUT",
        float,
        "seconds a request gets to send its whole body before it gets 408 and the connection is closed "
        "(default 30; 0 = no limit)",
    ),
    (
        "sse_keepalive",
        ("--sse-keepalive",),
        "HERON_SSE_KEEPALIVE",
        float,
        "send an SSE comment every N seconds while a stream waits for its first token (default 0 = off)",
    ),
    ("responses_store", ("--responses-store",), "HERON_RESPONSES_STORE", str,
     "SQLite file that keeps stored /v1/responses across restarts (default: in memory)"),
    ("responses_store_max", ("--responses-store-max",), "HERON_RESPONSES_STORE_MAX", int,
     "stored responses kept for previous_response_id and GET /v1/responses/{id}, least recently used "
     "dropped first (default 10000)"),
    ("max_grammar_bytes", ("--max-grammar-bytes",), "HERON_MAX_GRAMMAR_BYTES", parse_size,
     "largest structured-output spec (schema JSON, regex, grammar or choices; default 128KiB)"),
    ("max_schema_depth", ("--max-schema-depth",), "HERON_MAX_SCHEMA_DEPTH", int,
     "deepest JSON schema nesting, each $ref hop counting one level (default 128)"),
    ("max_schema_nodes", ("--max-schema-nodes",), "HERON_MAX_SCHEMA_NODES", int,
     "most subschemas in one JSON schema (default 5000)"),
    ("max_grammar_rules", ("--max-grammar-rules",), "HERON_MAX_GRAMMAR_RULES", int,
     "most rules and terminals in a Lark / GBNF grammar (default 2000)"),
    ("max_grammar_depth", ("--max-grammar-depth",), "HERON_MAX_GRAMMAR_DEPTH", int,
     "longest rule-reference chain plus parenthesis nesting in a grammar (default 128)"),
    ("max_regex_bytes", ("--max-regex-bytes",), "HERON_MAX_REGEX_BYTES", parse_size,
     "longest regex (the regex form, a schema pattern, a grammar terminal; default 8KiB)"),
    ("max_object_properties", ("--max-object-properties",), "HERON_MAX_OBJECT_PROPERTIES", int,
     "most properties of one object in a JSON schema (default 450)"),
    ("max_grammar_symbols", ("--max-grammar-symbols",), "HERON_MAX_GRAMMAR_SYMBOLS", int,
     "most symbols a compiled grammar may expand to (llguidance's max_grammar_size; default 100000)"),
    ("grammar_compile_workers", ("--grammar-compile-workers",), "HERON_GRAMMAR_COMPILE_WORKERS", int,
     "threads compiling structured-output grammars, at low CPU priority (default 1)"),
    ("max_grammar_queue", ("--max-grammar-queue",), "HERON_MAX_GRAMMAR_QUEUE", int,
     "grammars allowed to wait for a compile thread before new ones get 503 (default 16)"),
    ("grammar_compile_timeout", ("--grammar-compile-timeout",), "HERON_GRAMMAR_COMPILE_TIMEOUT", float,
     "seconds a request waits for its grammar to compile before a 400 (default 10)"),
    ("log_level", ("--log-level",), "HERON_LOG_LEVEL", str, "debug | info | warning | error"),
    (
        "log_format",
        ("--log-format",),
        "HERON_LOG_FORMAT",
        _log_format,
        "per-request log line: text (key=value, default) or json (one JSON object per request)",
    ),
]
_FLAGS: list[tuple[str, str, str, str]] = [
    ("enable_prefix_caching", "--enable-prefix-caching", "HERON_ENABLE_PREFIX_CACHING", "reuse KV blocks of shared prompt prefixes (default on)"),
    (
        "share_prefix_cache_across_keys",
        "--share-prefix-cache-across-keys",
        "HERON_SHARE_PREFIX_CACHE_ACROSS_KEYS",
        "let requests with different API keys reuse each other's cached prompt blocks (default off: "
        "`cached_tokens` would tell one tenant what another sent)",
    ),
    ("strict_fields", "--strict-fields", "HERON_STRICT_FIELDS", "reject unknown request fields with 400 instead of ignoring them"),
    ("disable_log_requests", "--disable-log-requests", "HERON_DISABLE_LOG_REQUESTS", "no log line per request"),
    ("log_prompts", "--log-prompts", "HERON_LOG_PROMPTS", "include the prompt (messages, prompt or input) in each request's log line (default off)"),
]


def build_parser(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """Add the serve options to `parser`, with defaults taken from the environment."""
    env = os.environ if environ is None else environ
    defaults = ServerSettings()
    parser.add_argument(
        "model",
        nargs="?",
        default=env.get("HERON_MODEL"),
        help="GGUF file or Hugging Face directory (env HERON_MODEL; default: bundled SmolLM2-135M-Instruct)",
    )
    for name, flags, env_name, convert, help_text in _OPTIONS:
        default = getattr(defaults, name)
        if env_name in env:
            raw = env[env_name]
            if convert is None:
                default = [p.strip() for p in raw.split(";") if p.strip()] if name == "models" else _list(raw)
            else:
                default = convert(raw)
        if convert is None:  # list option: repeat the flag; served names also take several values, as in vLLM
            nargs = "+" if name == "served_model_name" else None
            parser.add_argument(
                *flags, dest=name, nargs=nargs, action="extend" if nargs else "append", default=None,
                help=f"{help_text} [{env_name}]",
            )
            parser.set_defaults(**{f"_{name}_default": default})
        else:
            parser.add_argument(*flags, dest=name, type=convert, default=default, help=f"{help_text} [{env_name}]")
    for name, flag, env_name, help_text in _FLAGS:
        default = getattr(defaults, name)
        if env_name in env:
            default = _bool(env[env_name])
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=f"{help_text} [{env_name}]")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    values = {}
    for f in fields(ServerSettings):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and hasattr(args, f"_{f.name}_default"):
            value = getattr(args, f"_{f.name}_default")
        values[f.name] = value
    settings = ServerSettings(**values)
    if settings.kv_cache_memory is not None and settings.kv_cache_memory <= 0:
        raise ValueError("--kv-cache-memory must be positive")
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.data_parallel_load_bound < 0:
        raise ValueError("--data-parallel-load-bound must be 0 or more")
    return settings


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> ServerSettings:
    parser = build_parser(argparse.ArgumentParser(prog="heron serve"), environ)
    return settings_from_args(parser.parse_args(argv))
