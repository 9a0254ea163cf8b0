"""Data-parallel routing: prefix_aware vs round_robin vs least_loaded, DP=2, in one run.

Workload (a shared-prefix chat service): `--system-prompts` long system prompts (~`--system-tokens`
tokens each), `--users` users each asking one short distinct question under one of them (assigned
round robin, then shuffled with a fixed seed, so every policy sees the same sequence), sent by
`--concurrency` clients, greedy, `--max-tokens` tokens each (ignore_eos). For each policy a fresh
DataParallelEngine (two replica processes on the bundled SmolLM2-135M-Instruct, each with its own
prefix cache; `--data-parallel-size` changes the count) serves the whole sequence in-process (no
HTTP: what differs between policies is routing, nothing else).

Reported per policy: prefix-cache hit rate (hit tokens / queried tokens, summed over the replicas'
engine counters), TTFT p50 / p99 (generate() called -> first token out), output tokens/s (all tokens /
wall time), and how the router split the requests (routed per replica; by prefix affinity). A
prefix-aware router should hit the cache on nearly every request after each system prompt's first;
round robin prefills each system prompt once per replica, and more when the caches evict.

The default KV cache per replica (`--kv-cache-memory`) holds about 60% of the system prompts' blocks:
the case routing decides, where a replica that must keep every prompt evicts them (a cache that
holds everything everywhere makes every policy hit after each replica's first prefill of each).

Each policy runs `--repeats` times, the policies interleaved (so drift on a shared machine hits each
alike); the table gives the median run of each (by tokens/s; its other columns are that run's).

Usage: python benchmarks/data_parallel.py [--users 64] [--system-prompts 12] [--system-tokens 384]
                                          [--max-tokens 16] [--concurrency 8] [--data-parallel-size 2]
                                          [--repeats 3] [--load-bound 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

import source_trees  # benchmarks/source_trees.py, beside this script

source_trees.put_tree_first()

from heron.bench import machine_description, percentile  # noqa: E402

POLICIES = ("prefix_aware", "round_robin", "least_loaded")
TOPICS = ("a bicycle repair shop", "a public library", "a mountain weather station", "a bakery", "a train timetable desk",
          "a museum of clocks", "a harbour office", "a garden centre")
WORDS = ("always answer politely and briefly, cite the opening hours when asked, never invent prices, "
         "explain each step clearly, mention the safety rules, offer a follow up question, keep a warm tone").split()


def system_prompt(index: int, tokenizer, target_tokens: int) -> list[int]:
    text = f"You are the assistant of {TOPICS[index % len(TOPICS)]} (desk {index}). Rules:"
    ids = tokenizer.encode(text, add_special_tokens=False)
    i = 0
    while len(ids) < target_tokens:
        ids += tokenizer.encode(" " + WORDS[(i * 7 + index) % len(WORDS)], add_special_tokens=False)
        i += 1
    return ids[:target_tokens]


def workload(args, tokenizer) -> list[list[int]]:
    systems = [system_prompt(i, tokenizer, args.system_tokens) for i in range(args.system_prompts)]
    prompts = []
    for user in range(args.users):
        question = f"\nUser {user}: what should I know about item number {user * 37 % 1000}?\nAssistant:"
        prompts.append(systems[user % len(systems)] + tokenizer.encode(question, add_special_tokens=False))
    random.Random(0).shuffle(prompts)
    return prompts


async def drive(engine, prompts: list[list[int]], args) -> tuple[list[float], int, float]:
    from heron.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    queue = list(enumerate(prompts))
    ttfts: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            index, prompt = queue.pop(0)
            sent, first = time.monotonic(), None
            async for output in engine.generate(prompt, params, f"req-{index}"):
                if first is None and output.outputs[0].delta_token_ids:
                    first = time.monotonic()
                    ttfts.append(first - sent)
                if output.finished:
                    tokens += len(output.outputs[0].token_ids)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return ttfts, tokens, time.monotonic() - started


def run_policy(policy: str, loaded, prompts, args) -> dict:
    from heron.distributed.dp_engine import DataParallelEngine
    from heron.server.settings import ServerSettings

    settings = ServerSettings(
        data_parallel_size=args.data_parallel_size,
        data_parallel_policy=policy,
        data_parallel_load_bound=args.load_bound,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.concurrency,
    )
    engine = DataParallelEngine.launch(loaded, settings)
    engine.start()

    async def go():
        try:
            # Warm each replica's kernels with a prompt no user sends (not counted).
            from heron.sampling_params import SamplingParams

            for i in range(args.data_parallel_size):
                await _drain(engine.replicas[i].generate([1, 2, 3, 4 + i], SamplingParams(max_tokens=2), f"warm-{i}"))
            before = engine.stats
            ttfts, tokens, wall = await drive(engine, prompts, args)
            after = engine.stats
            return ttfts, tokens, wall, before, after, engine.router.routed, engine.router.affinity_routed
        finally:
            await engine.shutdown()

    ttfts, tokens, wall, before, after, routed, affinity = asyncio.run(go())
    queries = after.num_prefix_cache_queries - before.num_prefix_cache_queries
    hits = after.num_prefix_cache_hits - before.num_prefix_cache_hits
    return {
        "policy": policy,
        "hit_rate": hits / queries if queries else float("nan"),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "tok_s": tokens / wall,
        "routed": routed,
        "affinity": affinity,
        "wall": wall,
    }


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--system-prompts", type=int, default=12)
    parser.add_argument("--system-tokens", type=int, default=384)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--data-parallel-size", type=int, default=2)
    parser.add_argument("--load-bound", type=int, default=4)
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="bytes of KV cache per replica (default: ~60%% of the system prompts' KV)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    args = parser.parse_args()

    from heron.models.loader import load_model
    from heron.worker.model_runner import ModelRunner

    loaded = load_model(None, progress=False, with_weights=False)
    arch = loaded.arch_config
    if args.kv_cache_memory is None:
        per_token = ModelRunner.kv_bytes_per_block(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, 1, loaded.dtype)
        args.kv_cache_memory = int(0.6 * args.system_prompts * args.system_tokens * per_token)
    prompts = workload(args, loaded.tokenizer)
    runs: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    for repeat in range(args.repeats):
        for policy in args.policies:
            runs[policy].append(run_policy(policy, loaded, prompts, args))
            print(f"  run {repeat + 1}/{args.repeats}: {policy} ({runs[policy][-1]['wall']:.1f} s, "
                  f"{runs[policy][-1]['tok_s']:.1f} tok/s)", file=sys.stderr)
    results = [sorted(r, key=lambda run: run["tok_s"])[len(r) // 2] for r in runs.values()]

    mean_len = sum(map(len, prompts)) / len(prompts)
    print(f"\nSmolLM2-135M-Instruct, DP={args.data_parallel_size} (replica processes, "
          f"{max(1, (os.cpu_count() or 1) // args.data_parallel_size)} torch threads each), {args.users} users over "
          f"{args.system_prompts} system prompts of {args.system_tokens} tokens (prompts {mean_len:.0f} tokens on "
          f"average), {args.concurrency} concurrent clients, {args.max_tokens} tokens each (greedy, ignore_eos), "
          f"load bound {args.load_bound}, KV cache {args.kv_cache_memory / 2**20:.0f} MiB per replica; "
          f"median of {args.repeats} interleaved runs per policy")
    print(f"CPU: {machine_description()}\n")
    reference = next((r for r in results if r["policy"] == "round_robin"), results[0])
    print(f"| policy | prefix-cache hit rate | TTFT p50 (ms) | TTFT p99 (ms) | output tok/s | tok/s vs {reference['policy']} "
          f"| TTFT p50 vs {reference['policy']} | routed per replica | by affinity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['policy']} | {r['hit_rate']:.1%} | {r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} | "
              f"{r['tok_s']:.1f} | {r['tok_s'] / reference['tok_s']:.2f}x | {r['ttft_p50'] / reference['ttft_p50']:.2f}x | "
              f"{'/'.join(map(str, r['routed']))} | {sum(r['affinity'])} |")


if __name__ == "__main__":
    main()
