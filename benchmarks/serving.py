"""Serving benchmark: HTTP streaming load against an OpenAI-compatible server, next to the offline engine.

What it measures, for each concurrency level C (default 1, 8, 32):

- served: C concurrent clients (one shared httpx.AsyncClient, asyncio), each sending
  `--requests-per-client` streaming POST /v1/completions (or /v1/chat/completions with
  `--endpoint chat`) one after the other, with `max_tokens` 128, `temperature` 0, `ignore_eos`
  (vLLM's extension; `--no-ignore-eos` for servers without it) and
  `stream_options.include_usage` so output tokens are counted exactly (servers that send no usage
  chunk are counted by content chunks). Every request has its own short prompt (~20-40 tokens), so
  the prefix cache cannot flatter the numbers. Per request: TTFT = request sent -> first content
  chunk; TPOT = (last content chunk - first content chunk) / (output tokens - 1). Per level:
  output tokens/s = all output tokens / wall time of the level, and p50/p99 of TTFT and TPOT.
- offline: Heron's in-process engine (`heron.LLM`, same `max_num_seqs`) generating C of the same
  kind of prompts at once with the same sampling settings, tokens/s = generated tokens / wall time,
  median of up to `--offline-repeats` runs (fewer where another would overrun `--offline-budget`).
  It runs in a subprocess and never at the same time as a generating server: the script stops a
  server it started before the offline runs. The ratio served/offline is the cost of the HTTP layer
  (issue 4 asks for >= 0.85 at 32 clients).

Without `--url` the script starts `heron serve` on the bundled default model on a free local port
(`--max-num-seqs` = the largest concurrency), waits for GET /health, and stops it at the end. With
`--url` it drives whatever server runs there (Heron, llama.cpp's `llama-server`, vLLM...). Failed
requests are counted and their errors reported; they never stop the run.

The load generator itself (prompts, the timed streaming client, levels, percentiles) is `heron.bench`,
which `heron bench` also runs; this script adds starting a server and the offline comparison.

Usage:
  python benchmarks/serving.py                                  # starts heron serve itself
  python benchmarks/serving.py --concurrency 1 8 32 --max-tokens 128 --requests-per-client 2
  python benchmarks/serving.py --url http://127.0.0.1:8080 --no-offline --no-ignore-eos   # e.g. llama.cpp
  python benchmarks/serving.py --endpoint chat --duration 30   # chat API; each level runs 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from heron.bench import (
    Bench,
    BenchError,
    BenchParams,
    LevelResult,
    RequestResult,
    fmt_ms,
    fmt_s,
    level_notes,
    loadavg,
    machine_description,
    make_prompts,
    percentile,
)

# --------------------------------------------------------------------------------------------- client


def bench_params(args: argparse.Namespace) -> BenchParams:
    return BenchParams(
        endpoint=args.endpoint, concurrency=tuple(args.concurrency), requests_per_client=args.requests_per_client,
        duration=args.duration, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, timeout=args.timeout,
    )


async def run_served(
    base_url: str, args: argparse.Namespace, level_prompts: dict[int, list[str]]
) -> tuple[str | None, list[LevelResult], RequestResult | None]:
    async with Bench(base_url, bench_params(args), model=args.model) as bench:
        await bench.connect()
        levels = await bench.run(level_prompts)
    return bench.model, levels, bench.warmup


# --------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heron_command() -> list[str]:
    script = Path(sys.executable).parent / "heron"
    return [str(script)] if script.exists() else [sys.executable, "-m", "heron.cli"]


class HeronServer:
    """`heron serve` as a subprocess on a free port; output goes to a log file shown on failure."""

    def __init__(self, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="heron-serve-", suffix=".log", delete=False)
        self.cmd = heron_command() + [
            "serve", "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", str(args.max_num_seqs),
            "--disable-log-requests",
        ]
        if args.dtype:
            self.cmd += ["--dtype", args.dtype]
        self.cmd += args.server_arg
        self.proc: subprocess.Popen | None = None
        self.startup_timeout = args.startup_timeout

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self) -> None:
        print(f"  starting: {' '.join(self.cmd)} (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"heron serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"heron serve not healthy after {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # Ctrl-C first (the clean shutdown path), then harder.
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                print(f"  heron serve still running after {sig.name}", file=sys.stderr)
        if self.proc.returncode not in (0, -signal.SIGINT, 130):
            print(f"  heron serve exited with status {self.proc.returncode} on shutdown:\n{self.log_tail()}", file=sys.stderr)

    def remove_log(self) -> None:
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- offline


def offline_worker(args: argparse.Namespace) -> None:
    """Runs in its own process: LLM(max_num_seqs), then each batch size up to `--offline-repeats` times."""
    from heron import LLM, SamplingParams

    spec = json.loads(sys.stdin.read())
    llm = LLM(dtype=args.dtype or "auto", max_num_seqs=args.max_num_seqs, progress=False)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    def generate(prompts: list[str], p: SamplingParams):
        if args.endpoint == "chat":
            return llm.chat([[{"role": "user", "content": q}] for q in prompts], p)
        return llm.generate(prompts, p)

    generate(make_prompts(999_000, 2), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    results = {}
    for batch, runs in spec.items():
        rates, spent = [], 0.0
        for prompts in runs:
            start = time.perf_counter()
            outputs = generate(prompts, params)
            elapsed = time.perf_counter() - start
            spent += elapsed
            rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
            print(f"  offline batch {batch}: {rates[-1]:.1f} tok/s ({elapsed:.1f} s), load {loadavg()}",
                  file=sys.stderr, flush=True)
            if spent + elapsed > args.offline_budget:
                break  # another run would overrun this batch size's time budget
        results[batch] = rates
    print("RESULT " + json.dumps(results), flush=True)


def run_offline(args: argparse.Namespace, level_prompts: dict[int, list[str]]) -> dict[int, list[float]]:
    # Run k of batch C uses prompts [k*C, (k+1)*C) of the level's list: distinct within the offline
    # engine, so its prefix cache does not help across repeats either.
    spec = {}
    for c in args.concurrency:
        prompts = level_prompts[c]
        spec[str(c)] = [prompts[k * c:(k + 1) * c] for k in range(args.offline_repeats)]
    cmd = [
        sys.executable, __file__, "--offline-worker", "--max-num-seqs", str(args.max_num_seqs),
        "--max-tokens", str(args.max_tokens), "--endpoint", args.endpoint, "--offline-budget", str(args.offline_budget),
    ]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.run(cmd, input=json.dumps(spec), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[len("RESULT "):]).items()}
    print(f"  offline run failed (exit status {proc.returncode}); see its output above", file=sys.stderr)
    return {}



# --------------------------------------------------------------------------------------------- report


def heron_path(args) -> str:
    """The kernel build and dtype Heron runs the bundled model with on this machine (the report's
    first line names the CPU)."""
    from heron.models.bundled import default_chat_model_path
    from heron.models.loader import plan_run_path, resolve_device

    run_path = plan_run_path(default_chat_model_path(), args.dtype or "auto", resolve_device("cpu"))
    return run_path.describe()


def report(args, target: str, model: str | None, levels: list[LevelResult], offline: dict[int, list[float]],
           warmup: RequestResult | None, load_start: str) -> None:
    """The table this script has always printed (served vs offline), then the notes."""
    print()
    eos = "ignore_eos" if args.ignore_eos else "no ignore_eos"
    amount = f"{args.duration:g} s per level" if args.duration is not None else f"{args.requests_per_client} requests per client"
    print(
        f"Machine: {machine_description()}; load avg at start {load_start}, at end {loadavg()}. "
        f"Server: {target}; model: {model or 'unknown'}. "
        f"Endpoint /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}, streaming, "
        f"max_tokens={args.max_tokens}, {eos}, temperature=0, {amount}, max_num_seqs={args.max_num_seqs}. "
        + ("Offline: heron.LLM, batch = concurrency, median of "
           + ", ".join(f"{len(v)} run(s) at batch {c}" for c, v in offline.items()) + "."
           if offline else "Offline: not measured.")
    )
    print()
    print(f"Heron here (the server this script starts, and the offline engine): {heron_path(args)}")
    print()
    print("| concurrency | requests | output tok/s served | offline tok/s | served/offline "
          "| TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        ok = level.ok
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
        requests = f"{len(ok)}" if not level.failed else f"{len(ok)}/{len(level.results)} ({len(level.failed)} failed)"
        served = level.output_tokens_per_s
        rates = offline.get(level.concurrency)
        off = statistics.median(rates) if rates else None
        ratio = f"{served / off:.2f}" if off and ok else "-"
        print(
            f"| {level.concurrency} | {requests} | {served:.1f} | {f'{off:.1f}' if off else '-'} | {ratio} | "
            f"{fmt_s(percentile(ttfts, 50))} | {fmt_s(percentile(ttfts, 99))} | "
            f"{fmt_ms(percentile(tpots, 50))} | {fmt_ms(percentile(tpots, 99))} |"
        )
    print()

    notes = []
    if warmup is not None and not warmup.ok:
        notes.append(f"warm-up request failed: {warmup.error}")
    params = bench_params(args)
    for level in levels:
        notes += level_notes(level, params)
    for note in notes:
        print(f"- {note}")

    by_c = {level.concurrency: level for level in levels}
    if 32 in by_c and by_c[32].ok and offline.get(32):
        level = by_c[32]
        ratio = level.output_tokens_per_s / statistics.median(offline[32])
        ttft = percentile([r.ttft_s for r in level.ok if r.ttft_s is not None], 50)
        print(
            f"- issue 4 target at 32 clients: served/offline {ratio:.2f} "
            f"(needs >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'}), "
            f"TTFT p50 {ttft:.2f} s (needs < 1.5 s: {'met' if ttft < 1.5 else 'NOT met'})"
        )


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="base URL of a running server; default: start `heron serve` here")
    parser.add_argument("--model", default=None, help="model name to send (default: the first chat model of GET /v1/models)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--duration", type=float, default=None, help="seconds per level instead of a request count")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="for servers without vLLM's ignore_eos")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="server and offline engine (default: the largest concurrency)")
    parser.add_argument("--dtype", default=None, help="passed to heron serve and the offline engine (default: theirs)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for heron serve (repeatable)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline engine measurement")
    parser.add_argument("--offline-repeats", type=int, default=3, help="most offline runs per batch size; the median is reported")
    parser.add_argument("--offline-budget", type=float, default=60,
                        help="seconds per batch size: no further offline run starts that would likely overrun it")
    parser.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.concurrency = sorted(set(args.concurrency))
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.requests_per_client < 1 or args.offline_repeats < 1:
        parser.error("concurrency, max tokens, requests per client and offline repeats must be positive")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.concurrency)
    if args.offline_worker:
        offline_worker(args)
        return 0

    load_start = loadavg()
    # Distinct prompts per level (and enough for the offline repeats): a level never reuses another's.
    per_level = max(args.requests_per_client, args.offline_repeats)
    level_prompts, next_index = {}, 0
    for c in args.concurrency:
        level_prompts[c] = make_prompts(next_index, c * per_level)
        next_index += c * per_level

    server = None
    if args.url:
        base_url, target = args.url, args.url
    else:
        server = HeronServer(args)
        base_url, target = server.url, "heron serve (started by this script)"
    model, levels, warmup = None, [], None
    try:
        if server is not None:
            try:
                server.start()
            except RuntimeError as e:
                print(f"could not start the server: {e}", file=sys.stderr)
                return 1
        try:
            model, levels, warmup = asyncio.run(run_served(base_url, args, level_prompts))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    finally:
        if server is not None:
            server.stop()  # before the offline runs: the two must not share the CPUs
            server.remove_log()
    # With --url the server stays up, idle: it only generated while the levels above ran.
    offline = run_offline(args, level_prompts) if args.offline else {}
    report(args, target, model, levels, offline, warmup, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
