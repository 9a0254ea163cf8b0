"""Embedding throughput: Heron's EmbeddingEngine vs sentence-transformers, in one run.

Both embed the same texts with the bundled all-MiniLM-L6-v2 in fp32 on the same torch threads,
from strings (tokenisation included) to normalised vectors, truncating at 256 tokens the way
sentence-transformers does. Batch 1 embeds the texts one call at a time; batch N embeds N texts
per call (sentence-transformers with `batch_size=N`). "Heron, async" makes the same calls through
AsyncEmbeddingEngine (the server's path: its engine thread, queue and hand-back to the event loop)
over the same engine; its ratio to the direct calls is what that machinery costs. The two systems take turns call by call so
that noise from other work on the machine hits both alike; each figure is the median over the runs.
Prints a Markdown table with Heron / sentence-transformers ratios.

Usage: python benchmarks/embeddings.py [--runs 5] [--batch 64] [--num-single 16] [--num-batches 2] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a local package directory

WORDS = (
    "retrieval augmented generation splits documents into passages and embeds each one so that a "
    "question can find the few passages that answer it among millions stored in a vector index "
    "while the language model reads only those and cites them back to the user with confidence"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic passages of varied length, about 5 to 200 words (8 to 260 tokens): the
    spread of a RAG chunk store, short queries included."""
    texts = []
    for i in range(n):
        k = i + seed
        length = 5 + (k * 37) % 196
        words = [WORDS[(k * 7 + j * 11) % len(WORDS)] for j in range(length)]
        texts.append(f"Passage {k}: " + " ".join(words) + ".")
    return texts


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per system and batch size")
    parser.add_argument("--batch", type=int, default=64, help="inputs per call for the batched case")
    parser.add_argument("--num-batches", type=int, default=2, help="calls per batched run")
    parser.add_argument("--num-single", type=int, default=16, help="inputs per batch-1 run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from heron.engine.embedding import AsyncEmbeddingEngine, EmbeddingEngine
    from heron.models.bundled import default_embedding_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = default_embedding_model_path()
    heron = EmbeddingEngine.load(model_dir, dtype="float32", device="cpu")
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.eval()
    assert st.max_seq_length == heron.max_model_len, (st.max_seq_length, heron.max_model_len)

    def heron_embed(texts: list[str]) -> None:
        heron.embed(heron.tokenize(texts, truncate_prompt_tokens=-1, truncation_side="right"))

    # One event loop for every async call, as a server has; the engine thread starts once.
    loop = asyncio.new_event_loop()
    async_heron = AsyncEmbeddingEngine(heron)
    async_heron.start()

    def heron_async_embed(texts: list[str]) -> None:
        ids = heron.tokenize(texts, truncate_prompt_tokens=-1, truncation_side="right")
        loop.run_until_complete(async_heron.embed(ids))

    def st_embed(texts: list[str]) -> None:
        st.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)

    singles = make_texts(args.num_single)
    batches = [make_texts(args.batch, seed=1000 + b * args.batch) for b in range(args.num_batches)]
    token_counts = {
        "single": sum(map(len, heron.tokenize(singles, -1, "right"))),
        "batch": sum(len(ids) for b in batches for ids in heron.tokenize(b, -1, "right")),
    }
    # Each case is a list of calls; one run makes every call once per system.
    cases = {
        "single": (1, [[t] for t in singles]),
        "batch": (args.batch, batches),
    }
    systems = {"Heron": heron_embed, "Heron, async": heron_async_embed, "sentence-transformers": st_embed}

    for embed in systems.values():  # warm-up: first-call allocations, oneDNN kernel selection
        embed(singles[:4])
        embed(batches[0])

    # The systems take turns call by call, the first one alternating, so that a burst of other work
    # on the machine lands on both alike; a run's time for a system is the sum of its calls.
    seconds: dict[tuple[str, str], list[float]] = {}
    names = list(systems)
    for run in range(args.runs):
        for case, (_, calls) in cases.items():
            totals = dict.fromkeys(names, 0.0)
            for i, texts in enumerate(calls):
                # Rotate who goes first, so that no system always follows the same one.
                shift = (run + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    totals[name] += _time(lambda: systems[name](texts))
            for name, total in totals.items():
                seconds.setdefault((case, name), []).append(total)

    import heron as heron_package
    from heron.bench import machine_description

    print(f"\nCPU: {machine_description()}\nheron from: {os.path.dirname(heron_package.__file__)}")
    print(
        f"all-MiniLM-L6-v2, fp32, {torch.get_num_threads()} torch threads, median of {args.runs} runs; "
        f"batch-1 corpus {len(singles)} texts / {token_counts['single']} tokens, "
        f"batch-{args.batch} corpus {args.batch * len(batches)} texts / {token_counts['batch']} tokens\n"
    )
    # The ratio of best runs is printed beside the median one: on a shared machine the fastest run
    # is the one least disturbed, so it is the steadier comparison of the two.
    print("| batch | system | inputs/s | tokens/s | Heron / s-t (median) | Heron / s-t (best run) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    st_name = "sentence-transformers"
    for case, (batch_size, calls) in cases.items():
        num_inputs = sum(map(len, calls))
        medians = {name: statistics.median(seconds[(case, name)]) for name in systems}
        bests = {name: min(seconds[(case, name)]) for name in systems}
        for name in systems:
            t = medians[name]
            ratios = (
                f"{medians[st_name] / t:.2f}x | {bests[st_name] / bests[name]:.2f}x"
                if name != st_name
                else "1.00x | 1.00x"
            )
            rates = f"{num_inputs / t:,.1f} | {token_counts[case] / t:,.0f}"
            print(f"| {batch_size} | {name} | {rates} | {ratios} |")
    print()
    for case, (batch_size, _) in cases.items():
        direct, through = (statistics.median(seconds[(case, n)]) for n in ("Heron", "Heron, async"))
        print(f"Heron async / direct, batch {batch_size}, throughput (median): {direct / through:.3f}x")
    loop.run_until_complete(async_heron.shutdown())
    loop.close()


if __name__ == "__main__":
    main()
