"""The `heron` command: serve, generate, chat, inspect, bench.

Each subcommand parses its own flags (vLLM's names where vLLM has the same option) and imports the
heavy modules only when it runs, so `heron --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from heron.config import DEFAULT_MAX_NUM_SEQS, describe_batched_tokens_default


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                   help=f"most sequences decoded together (default {DEFAULT_MAX_NUM_SEQS})")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"token budget of one engine step (default {describe_batched_tokens_default()})")
    p.add_argument("--chat-template", default=None, help="a chat template file overriding the model's")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args: argparse.Namespace):
    from heron import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        chat_template=args.chat_template,
    )


def _sampling(args: argparse.Namespace):
    from heron import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.raw:
        outputs = llm.generate(prompts, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for prompt, out in zip(prompts, outputs):
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text, "finish_reason": completion.finish_reason.value}))
        else:
            print(completion.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling(args)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params)[0].outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})


def _describe_defaults(model) -> str:
    values = " ".join(f"{k}={v}" for k, v in model.generation_defaults.items()) or "OpenAI's (temperature=1 top_p=1)"
    return f"{values} from {model.generation_defaults_source}"


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inspect_model(model: str | None, dtype: str = "auto", device: str = "auto") -> dict[str, Any]:
    """What a user needs to know before serving a model, read without loading its weights."""
    import torch

    from heron.models.arch_config import ArchConfig
    from heron.models.gguf import GGUFFile
    from heron.models.loader import plan_run_path, resolve_device, resolve_model_path, safetensors_files
    from heron.models.tokenizer import Tokenizer

    path = resolve_model_path(model)
    gguf = GGUFFile(path) if path.is_file() else None
    run_path = plan_run_path(path, dtype, resolve_device(device), gguf=gguf)
    run_dtype = run_path.dtype
    info: dict[str, Any] = {"path": str(path)}
    if gguf is not None:
        config = ArchConfig.from_gguf(gguf, "output.weight" in gguf.tensor_names)
        tokenizer = Tokenizer.from_gguf(gguf.metadata)
        num_params = gguf.num_parameters
        info.update(
            format="gguf",
            name=gguf.metadata.get("general.name"),
            quantization=", ".join(f"{k} x{v}" for k, v in sorted(gguf.tensor_types().items(), key=lambda kv: -kv[1])),
            chat_template_source="GGUF metadata (tokenizer.chat_template)" if gguf.metadata.get("tokenizer.chat_template") else None,
        )
    else:
        from safetensors import safe_open

        hf_config = json.loads((path / "config.json").read_text())
        tokenizer = Tokenizer.from_hf_dir(path)
        num_params = 0
        stored: set[str] = set()
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if sl.get_dtype().startswith(("I", "U", "BOOL")):
                        continue  # index buffers (position_ids), not weights
                    shape = sl.get_shape()
                    count = 1
                    for d in shape:
                        count *= d
                    num_params += count
                    stored.add(sl.get_dtype())
        architecture = (hf_config.get("architectures") or ["?"])[0]
        config = None if architecture == "BertModel" else ArchConfig.from_hf_config(hf_config)
        template_source = None
        if (path / "chat_template.jinja").exists():
            template_source = "chat_template.jinja"
        elif tokenizer.chat_template:
            template_source = "tokenizer_config.json"
        info.update(format="hf", name=path.name, quantization=f"none (stored as {', '.join(sorted(stored))})", chat_template_source=template_source)
        if config is None:
            info.update(architecture=architecture, context_length=hf_config.get("max_position_embeddings"), hidden_size=hf_config.get("hidden_size"), num_layers=hf_config.get("num_hidden_layers"))
    element = torch.tensor([], dtype=run_dtype).element_size()
    if config is not None:
        info.update(
            architecture=config.architecture,
            context_length=config.max_position_embeddings,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            attention_heads=f"{config.num_attention_heads} (KV heads {config.num_key_value_heads}, head dim {config.head_dim})",
            rope=f"theta {config.rope_theta:g}" + (f", scaling {config.rope_scaling}" if config.rope_scaling else ""),
            tied_embeddings=config.tie_word_embeddings,
        )
    info.update(
        parameters=num_params,
        run_dtype=str(run_dtype).removeprefix("torch."),
        run_path=run_path.describe(),
        weight_memory=_format_bytes(num_params * element),
        vocab_size=tokenizer.vocab_size,
        special_tokens={k: v for k, v in tokenizer.special_tokens.items() if v is not None},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        add_bos_token=tokenizer.add_bos_token,
    )
    if run_path.kernels is not None:
        info["cpu"] = run_path.kernels.cpu
    if config is not None:
        kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
        info["kv_cache_per_token"] = _format_bytes(kv_per_token)
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, args.dtype, args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, int) and key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from heron.server.app import create_app
    from heron.server.registry import load_served_models
    from heron.server.runner import run
    from heron.server.settings import settings_from_args

    settings = settings_from_args(args)
    # JSON logs are one JSON object per line, with nothing around it for a log shipper to strip.
    line_format = "%(message)s" if settings.log_format == "json" else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level.upper(), format=line_format, stream=sys.stderr)
    log = logging.getLogger("heron.server")
    # Load before binding the port, so a client that can connect finds the models ready.
    registry = load_served_models(settings, progress=sys.stderr.isatty())
    for model in registry.models:
        loaded = model.loaded
        where = f"{loaded.device}, {str(loaded.dtype).removeprefix('torch.')}"
        if model.kind == "generate":
            runtime = model.engine.core.runtime
            detail = (
                f"KV cache {_format_bytes(runtime.kv_cache_bytes)} in {runtime.num_kv_blocks} blocks of "
                f"{runtime.block_size} tokens"
            )
        else:
            detail = "rerank and score (cross-encoder)" if model.kind == "score" else "embeddings"
        if loaded.run_path is not None:
            log.info("model %s runs in %s; CPU: %s", model.names[0], loaded.run_path.describe(),
                     loaded.run_path.kernels.cpu if loaded.run_path.kernels else loaded.device)
        log.info(
            "model %s: %s (%s) on %s; context %d tokens; %s; memory %s",
            ", ".join(model.names),
            loaded.source,
            loaded.quantization,
            where,
            model.max_model_len,
            detail,
            _format_bytes(model.memory_bytes),
        )
        if model.kind == "generate":
            log.info("model %s: sampling defaults %s", model.names[0], _describe_defaults(model))
    app = create_app(settings, registry)
    log.info("serving at http://%s:%d/v1 (docs at /docs)", settings.host, settings.port)
    status = 0
    try:
        status = run(
            app,
            settings.host,
            settings.port,
            settings.log_level,
            settings.drain_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            header_timeout=settings.header_timeout,
        )
    except KeyboardInterrupt:
        pass
    finally:
        asyncio.run(registry.shutdown())
    return status


def cmd_bench(args: argparse.Namespace) -> int:
    from heron.bench import run_command

    return run_command(args)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="root URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", default=None, help="model name to send (default: the first chat model in GET /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $HERON_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions or /v1/completions (default: chat)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], metavar="C",
                   help="concurrent clients, one level each (default: 1 4 16)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-client", type=int, default=4, metavar="N",
                        help="requests each client sends, one after the other (default: 4)")
    amount.add_argument("--duration", type=float, default=None, metavar="S",
                        help="run each level for S seconds instead of a number of requests")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: 128)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="pad each prompt to about N tokens (default: short prompts of ~20-40 tokens)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (vLLM's extension; some servers reject it): answers may end early")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="where report.md, results.json and the plots go (default: ./heron-bench-<timestamp>/)")
    p.add_argument("--label", default=None, help="name of the system in the report and plots (default: the server's owned_by, else host:port)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RESULTS_JSON",
                   help="results.json of earlier runs (other servers) to put in the same table and plots")


def build_parser() -> argparse.ArgumentParser:
    from heron.server.settings import build_parser as add_serve_args

    parser = argparse.ArgumentParser(prog="heron", description="Heron: a small, fast LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API (default: the bundled model)",
        description=(
            "Serve the OpenAI-compatible HTTP API. A failing request ends with its own error and never stops "
            "the engine; should an engine still die, the server drains for up to 5 s and exits with status 1, "
            "so run it under a supervisor that restarts it (systemd Restart=on-failure, Kubernetes, "
            "docker --restart). SIGTERM drains (--drain-timeout) and exits 0."
        ),
    )
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate completions offline for prompts (arguments or stdin lines)")
    _add_model_args(p)
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); default: read lines from stdin")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat in the terminal")
    _add_model_args(p)
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="print what a model is, without loading its weights")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "bench",
        help="benchmark any OpenAI-compatible server: tokens/s, TTFT, TPOT per concurrency; report and plots",
        description="Streams chat (or text) completions to an OpenAI-compatible server (Heron, vLLM, llama.cpp, "
        "Ollama...) at each concurrency level, and writes report.md, results.json and PNG plots "
        "(throughput, TTFT and TPOT percentiles against concurrency) to an output directory.",
    )
    _add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"heron: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
