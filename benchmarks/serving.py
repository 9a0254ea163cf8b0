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

The server and the offline worker import heron from this checkout, whatever the venv's editable
install points at, and report where they did (source_trees.py). With `--baseline DIR`, another
checkout (e.g. the commit before a change, `git worktree add ../base HEAD~1`), each sweep also starts
`heron serve` and the offline worker from DIR's heron, this tree then the baseline (A B per repeat,
`--repeats` sweeps per tree, a fresh server each), and the table adds the baseline's rows and a
"this tree / baseline" row per level: ratios of the median served and offline tokens/s and of the
latency percentiles (over every sweep's requests). The header names both revisions.

Usage:
  python benchmarks/serving.py                                  # starts heron serve itself
  python benchmarks/serving.py --concurrency 1 8 32 --max-tokens 128 --requests-per-client 2
  python benchmarks/serving.py --url http://127.0.0.1:8080 --no-offline --no-ignore-eos   # e.g. llama.cpp
  python benchmarks/serving.py --endpoint chat --duration 30   # chat API; each level runs 30 s
  python benchmarks/serving.py --baseline ../heron-base --repeats 3   # this tree vs another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import source_trees  # benchmarks/source_trees.py, beside this script

source_trees.put_tree_first()  # before heron.bench: this checkout's heron, not the editable install's

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
from source_trees import Tree, WrongTree, fmt_ratio

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


class HeronServer:
    """`heron serve` from one tree as a subprocess on a free port; output goes to a log file shown on failure."""

    def __init__(self, args: argparse.Namespace, tree: Tree):
        self.tree = tree
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="heron-serve-", suffix=".log", delete=False)
        self.serve_args = [
            "serve", "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", str(args.max_num_seqs),
            "--disable-log-requests",
        ]
        if args.dtype:
            self.serve_args += ["--dtype", args.dtype]
        if args.max_num_batched_tokens:
            self.serve_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        self.serve_args += args.server_arg
        self.cmd = source_trees.heron_cli_command() + self.serve_args
        self.proc: subprocess.Popen | None = None
        self.startup_timeout = args.startup_timeout
        self.heron_file: str | None = None

    def log_tail(self, n: int | None = 3000) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""
        return text if n is None else text[-n:]

    def start(self) -> None:
        print(f"  starting: heron {' '.join(self.serve_args)} from {self.tree.describe()} (log: {self.log.name})",
              file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.tree.env())
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"heron serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    # The launcher printed it before importing the server, so it is in the log by now.
                    self.heron_file = self.tree.check(source_trees.heron_file_in(self.log_tail(None)), "heron serve")
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
    # The step budget only when given: a tree's own default is what "as configured" means.
    budget = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM(dtype=args.dtype or "auto", max_num_seqs=args.max_num_seqs, progress=False, **budget)
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
    print("RESULT " + json.dumps({"heron_file": source_trees.worker_heron_file(), "rates": results}), flush=True)


def run_offline(
    args: argparse.Namespace, level_prompts: dict[int, list[str]], tree: Tree
) -> tuple[dict[int, list[float]], str | None]:
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
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    proc = subprocess.run(cmd, input=json.dumps(spec), stdout=subprocess.PIPE, text=True, env=tree.env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            tree.check(result["heron_file"], "the offline worker")
            return {int(k): v for k, v in result["rates"].items()}, result["heron_file"]
    print(f"  offline run failed (exit status {proc.returncode}); see its output above", file=sys.stderr)
    return {}, None


# --------------------------------------------------------------------------------------------- report


@dataclass
class TreeRuns:
    """Every sweep from one tree: a LevelResult per level and sweep, the offline rates of all its workers."""

    tree: Tree
    model: str | None = None
    levels: dict[int, list[LevelResult]] = field(default_factory=dict)
    offline: dict[int, list[float]] = field(default_factory=dict)
    warmups: list[RequestResult | None] = field(default_factory=list)
    heron_files: set[str] = field(default_factory=set)

    def add_served(self, model: str | None, levels: list[LevelResult], warmup: RequestResult | None) -> None:
        self.model = self.model or model
        for level in levels:
            self.levels.setdefault(level.concurrency, []).append(level)
        self.warmups.append(warmup)

    def add_offline(self, rates: dict[int, list[float]]) -> None:
        for c, r in rates.items():
            self.offline.setdefault(c, []).extend(r)


@dataclass(frozen=True)
class Row:
    """One tree's numbers at one level: tokens/s the median over sweeps, latencies over all their requests."""

    requests: str
    served: float | None
    offline: float | None
    ttft: tuple[float, float]  # p50, p99
    tpot: tuple[float, float]
    any_ok: bool

    @classmethod
    def of(cls, levels: list[LevelResult], rates: list[float] | None) -> Row:
        ok = [r for level in levels for r in level.ok]
        total = sum(len(level.results) for level in levels)
        requests = f"{len(ok)}" if total == len(ok) else f"{len(ok)}/{total} ({total - len(ok)} failed)"
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
        return cls(requests, source_trees.median([level.output_tokens_per_s for level in levels]),
                   source_trees.median(rates or []), (percentile(ttfts, 50), percentile(ttfts, 99)),
                   (percentile(tpots, 50), percentile(tpots, 99)), bool(ok))

    def cells(self) -> list[str]:
        ratio = f"{self.served / self.offline:.2f}" if self.offline and self.any_ok and self.served is not None else "-"
        return [self.requests, "-" if self.served is None else f"{self.served:.1f}",
                f"{self.offline:.1f}" if self.offline else "-", ratio,
                fmt_s(self.ttft[0]), fmt_s(self.ttft[1]), fmt_ms(self.tpot[0]), fmt_ms(self.tpot[1])]


def ratio_cells(this: Row, base: Row) -> list[str]:
    """The "this tree / baseline" row: above 1 is faster for tokens/s, slower for TTFT and TPOT."""
    r = source_trees.ratio
    return ["-", fmt_ratio(r(this.served, base.served)), fmt_ratio(r(this.offline, base.offline)), "-",
            *(fmt_ratio(r(a, b)) for a, b in zip(this.ttft + this.tpot, base.ttft + base.tpot))]


def results_table(concurrency: list[int], runs: list[TreeRuns]) -> list[str]:
    """The served vs offline table; with a baseline, a tree column and a ratio row per level."""
    columns = ["concurrency", "requests", "output tok/s served", "offline tok/s", "served/offline",
               "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    with_trees = len(runs) > 1
    if with_trees:
        columns.insert(1, "tree")
    aligns = ["---" if name == "tree" else "---:" for name in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(aligns) + " |"]
    for c in concurrency:
        rows = [(run, Row.of(run.levels[c], run.offline.get(c))) for run in runs if run.levels.get(c)]
        for run, row in rows:
            tree = [f"{run.tree.name} {run.tree.revision}"] if with_trees else []
            lines.append("| " + " | ".join([str(c), *tree, *row.cells()]) + " |")
        if with_trees and len(rows) == 2:
            lines.append("| " + " | ".join([str(c), "this tree / baseline", *ratio_cells(rows[0][1], rows[1][1])]) + " |")
    return lines


def heron_path(args) -> str:
    """The kernel build and dtype Heron runs the bundled model with on this machine (the report's
    first line names the CPU)."""
    from heron.models.bundled import default_chat_model_path
    from heron.models.loader import plan_run_path, resolve_device

    run_path = plan_run_path(default_chat_model_path(), args.dtype or "auto", resolve_device("cpu"))
    return run_path.describe()


def offline_counts(offline: dict[int, list[float]]) -> str:
    return ", ".join(f"{len(v)} run(s) at batch {c}" for c, v in offline.items())


def report(args, target: str, runs: list[TreeRuns], load_start: str) -> None:
    """The table this script has always printed (served vs offline), then the notes."""
    print()
    eos = "ignore_eos" if args.ignore_eos else "no ignore_eos"
    amount = f"{args.duration:g} s per level" if args.duration is not None else f"{args.requests_per_client} requests per client"
    if args.repeats > 1 or len(runs) > 1:
        amount += f", {args.repeats} sweep(s) per tree"
    if len(runs) == 1:
        offline = "median of " + offline_counts(runs[0].offline) if runs[0].offline else ""
    else:
        offline = "; ".join(f"median of {offline_counts(run.offline)} ({run.tree.name})" for run in runs if run.offline)
    print(
        f"Machine: {machine_description()}; load avg at start {load_start}, at end {loadavg()}. "
        f"Server: {target}; model: {runs[0].model or 'unknown'}. "
        f"Endpoint /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}, streaming, "
        f"max_tokens={args.max_tokens}, {eos}, temperature=0, {amount}, max_num_seqs={args.max_num_seqs}, "
        f"max_num_batched_tokens={args.max_num_batched_tokens or 'each tree default'}. "
        + (f"Offline: heron.LLM, batch = concurrency, {offline}." if offline else "Offline: not measured.")
    )
    print(source_trees.header([run.tree for run in runs], {run.tree.name: run.heron_files for run in runs}))
    print()
    print(f"Heron here (the server this script starts, and the offline engine): {heron_path(args)}")
    print()
    print("\n".join(results_table(args.concurrency, runs)))
    if len(runs) > 1:
        print("(this tree / baseline: above 1 is faster for tok/s, slower for TTFT and TPOT; "
              "tok/s from the medians over sweeps, latencies over all the sweeps' requests)")
    print()

    notes = []
    params = bench_params(args)
    for run in runs:
        # Which tree and sweep a note is about, where there is more than one.
        for i, warmup in enumerate(run.warmups):
            where = f"{run.tree.name}, sweep {i + 1}: " if len(runs) > 1 or args.repeats > 1 else ""
            if warmup is not None and not warmup.ok:
                notes.append(f"{where}warm-up request failed: {warmup.error}")
            for c in args.concurrency:
                if i < len(run.levels.get(c, [])):
                    notes += [where + note for note in level_notes(run.levels[c][i], params)]
    for note in notes:
        print(f"- {note}")

    this = runs[0]
    if this.levels.get(32) and this.offline.get(32):
        row = Row.of(this.levels[32], this.offline[32])
        if row.any_ok and row.served is not None and row.offline:
            ratio, ttft = row.served / row.offline, row.ttft[0]
            print(
                f"- issue 4 target at 32 clients: served/offline {ratio:.2f} "
                f"(needs >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'}), "
                f"TTFT p50 {ttft:.2f} s (needs < 1.5 s: {'met' if ttft < 1.5 else 'NOT met'})"
            )


# --------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="step token budget of the server and offline engine (default: theirs; give it when "
                             "comparing with a baseline whose default differs)")
    parser.add_argument("--dtype", default=None, help="passed to heron serve and the offline engine (default: theirs)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for heron serve (repeatable)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline engine measurement")
    parser.add_argument("--offline-repeats", type=int, default=3, help="most offline runs per batch size; the median is reported")
    parser.add_argument("--offline-budget", type=float, default=60,
                        help="seconds per batch size: no further offline run starts that would likely overrun it")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="another Heron checkout: its heron serve and offline engine run too, interleaved with this tree's")
    parser.add_argument("--repeats", type=int, default=1,
                        help="sweeps (served levels, then the offline worker) per tree, each with a fresh server")
    parser.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.concurrency = sorted(set(args.concurrency))
    if (min(args.concurrency) < 1 or args.max_tokens < 1 or args.requests_per_client < 1 or args.offline_repeats < 1
            or args.repeats < 1):
        parser.error("concurrency, max tokens, requests per client, offline repeats and repeats must be positive")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.concurrency)
    if args.baseline is not None and not args.offline_worker:
        if args.url:
            parser.error("--baseline starts heron serve from each tree; it cannot drive the server at --url")
        try:
            Tree.at("baseline", args.baseline)
        except ValueError as e:
            parser.error(f"--baseline: {e}")
    return args


def sweep(args: argparse.Namespace, tree: Tree, level_prompts: dict[int, list[str]], into: TreeRuns) -> int:
    """The served levels, then the offline runs, from one tree; 0, or the exit status to stop with."""
    server = None if args.url else HeronServer(args, tree)
    base_url = args.url or server.url
    try:
        if server is not None:
            try:
                server.start()
            except RuntimeError as e:
                print(f"could not start the server: {e}", file=sys.stderr)
                return 1
            into.heron_files.add(server.heron_file)
        try:
            into.add_served(*asyncio.run(run_served(base_url, args, level_prompts)))
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
    if args.offline:
        rates, heron_file = run_offline(args, level_prompts, tree)
        into.add_offline(rates)
        if heron_file:
            into.heron_files.add(heron_file)
    return 0


def main() -> int:
    args = parse_args()
    if args.offline_worker:
        offline_worker(args)
        return 0

    load_start = loadavg()
    # Distinct prompts per level (and enough for the offline repeats): a level never reuses another's.
    # Every sweep sends the same ones, each to a fresh server, so the trees get the same work.
    per_level = max(args.requests_per_client, args.offline_repeats)
    level_prompts, next_index = {}, 0
    for c in args.concurrency:
        level_prompts[c] = make_prompts(next_index, c * per_level)
        next_index += c * per_level

    runs = [TreeRuns(tree) for tree in source_trees.trees(args.baseline)]
    if args.url:
        target = args.url
    elif len(runs) > 1:
        target = "heron serve from each tree (started by this script for each sweep)"
    else:
        target = "heron serve (started by this script)"
    try:
        for _ in range(args.repeats):
            for run in runs:  # A B A B: drift over the run hits both trees alike
                status = sweep(args, run.tree, level_prompts, run)
                if status:
                    return status
    except WrongTree as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(args, target, runs, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
