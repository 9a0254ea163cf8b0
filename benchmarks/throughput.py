"""Offline generation throughput: Heron vs transformers `generate` vs llama.cpp, in one run.

Each system runs in its own subprocess (so each reports its own peak RSS) on the bundled
SmolLM2-135M-Instruct, with ignore_eos so every request produces exactly `--max-tokens` tokens:

- batch: N prompts generated together (Heron: continuous batching; transformers: one padded batch);
- single stream: one prompt; decode tokens/s counts the tokens after the first over the time
  after the first token (prefill excluded), for every system.

Heron runs twice: as configured by default (CPU kernels with int8 activations, as llama.cpp computes
these weight types) and with float32 activations (HERON_CPU_INT8=0), the arithmetic transformers does.
On a CPU with AVX-512 VNNI, where the default is the AVX-512 build, it also runs with the AVX2 build
forced (HERON_CPU_ISA=avx2), so the two builds are compared in the same run. The header names the CPU,
its flags and the path (dtype, build, activations).
llama.cpp (through llama-cpp-python, an optional benchmark dependency) runs the single stream only.

Every Heron worker imports heron from this checkout, whatever the venv's editable install points at, and
reports where it did (source_trees.py). With `--baseline DIR`, another checkout (e.g. the commit before a
change, `git worktree add ../base HEAD~1`), each Heron cell (not transformers, not llama.cpp) also runs
from DIR's heron, this tree then the baseline on each repeat, and the report adds the baseline's rows and
"this tree / baseline" ratios of the median tokens/s; the header names both revisions.
Usage: python benchmarks/throughput.py [--num-prompts 64] [--max-tokens 128] [--dtype auto] [--repeats 1]
                                       [--baseline DIR] [--max-num-batched-tokens N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import source_trees  # benchmarks/source_trees.py, beside this script
from source_trees import Tree, WrongTree, fmt_ratio

WORDS = (
    "the river carries light across old stones while birds argue about the weather and a small "
    "boat drifts toward the harbour where lanterns wait for evening travellers who remember songs"
).split()


def make_prompts(n: int) -> list[str]:
    """Deterministic prompts of varied length (about 8 to 60 words)."""
    prompts = []
    for i in range(n):
        length = 8 + (i * 7) % 53
        words = [WORDS[(i * 3 + j * 5) % len(WORDS)] for j in range(length)]
        prompts.append(f"Story {i}: " + " ".join(words))
    return prompts


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_heron(args) -> dict:
    from heron import LLM, SamplingParams

    # The step budget only when given: a tree's own default is what "as configured" means.
    budget = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM(dtype=args.dtype, max_num_seqs=max(args.num_prompts, 1), progress=False, **budget)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = make_prompts(args.num_prompts)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    if args.mode == "batch":
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"tokens_per_s": num_tokens / elapsed, "num_tokens": num_tokens, "seconds": elapsed}
    # Single stream: step the engine ourselves to time the first token apart from the rest.
    engine = llm.engine
    ids = llm.tokenizer.encode(prompts[0])
    engine.add_request("single", ids, params)
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens_per_s": (args.max_tokens - 1) / (end - first), "ttft_s": first - start, "num_tokens": args.max_tokens}


def run_heron_float32(args) -> dict:
    os.environ["HERON_CPU_INT8"] = "0"  # read when the weights are packed, at load
    return run_heron(args)


def run_heron_avx2(args) -> dict:
    os.environ["HERON_CPU_ISA"] = "avx2"  # read when the kernels are first loaded
    return run_heron(args)


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heron.models.bundled import default_chat_model_path
    from heron.models.loader import resolve_device, resolve_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_chat_model_path()
    dtype = resolve_dtype(args.dtype, resolve_device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    prompts = make_prompts(args.num_prompts if args.mode == "batch" else 1)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    gen = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.inference_mode():
        model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=4, min_new_tokens=4, **gen)
        if args.mode == "batch":
            start = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, **gen)
            elapsed = time.perf_counter() - start
            num_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
            return {"tokens_per_s": num_tokens / elapsed, "num_tokens": num_tokens, "seconds": elapsed}
        # Prefill + 1 token, then the full run: the difference is the decode time.
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **gen)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, **gen)
        total = time.perf_counter() - start
        return {"tokens_per_s": (args.max_tokens - 1) / (total - ttft), "ttft_s": ttft, "num_tokens": args.max_tokens}


def run_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    from heron.models.bundled import default_chat_model_path

    llm = Llama(model_path=str(default_chat_model_path()), n_threads=os.cpu_count(), n_ctx=2048, verbose=False)
    prompt = make_prompts(1)[0]
    llm(prompt, max_tokens=4)
    start = time.perf_counter()
    first = None
    count = 0
    # llama-cpp-python has no ignore_eos; a logit_bias on EOS keeps it generating.
    for _ in llm(prompt, max_tokens=args.max_tokens, stream=True, temperature=0.0, logit_bias={llm.token_eos(): -1e9}):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens_per_s": (count - 1) / (end - first), "ttft_s": first - start, "num_tokens": count}


WORKERS = {
    "heron": run_heron,
    "heron, float32 activations": run_heron_float32,
    "heron, AVX2 build": run_heron_avx2,
    "transformers": run_transformers,
    "llama.cpp": run_llama_cpp,
}


def is_heron(system: str) -> bool:
    """A Heron cell: the ones --baseline runs again from the other tree."""
    return system == "heron" or system.startswith("heron,")


def worker_main(args) -> None:
    result = WORKERS[args.worker](args)
    result["peak_rss_mib"] = peak_rss_mib()
    result["heron_file"] = source_trees.worker_heron_file()
    print("RESULT " + json.dumps(result))


def spawn(system: str, mode: str, args, tree: Tree) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", system, "--mode", mode,
        "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
    ]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tree.env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            tree.check(result.get("heron_file"), f"the {system} ({mode}) worker")
            return result
    sys.stderr.write(f"{system} ({mode}, {tree.name}) failed:\n{proc.stderr[-2000:]}\n")
    return None


def median_run(runs: list[dict]) -> dict:
    """The run whose tokens/s is the median (the upper middle of an even count), TTFT and RSS with it."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def workload(mode: str, num_prompts: int) -> str:
    return f"{num_prompts} prompts together" if mode == "batch" else "1 stream (decode)"


Results = dict[tuple[str, str, str], dict]  # (system, mode, tree name) -> the median run


def results_table(results: Results, num_prompts: int, tree_list: list[Tree]) -> list[str]:
    """The Markdown table; a tree column only when there is a baseline, so the default table stays as it was."""
    revisions = {t.name: t.revision for t in tree_list}
    with_trees = len(tree_list) > 1
    lines = ["| system | tree | workload | tokens/s | TTFT | peak RSS |" if with_trees
             else "| system | workload | tokens/s | TTFT | peak RSS |"]
    lines.append("| --- | --- | --- | ---: | ---: | ---: |" if with_trees else "| --- | --- | ---: | ---: | ---: |")
    for (system, mode, tree), r in results.items():
        ttft = f"{r['ttft_s'] * 1000:.0f} ms" if "ttft_s" in r else "-"
        # transformers and llama.cpp take only the model's path from heron: no tree to name.
        cells = [system] + ([f"{tree} {revisions[tree]}" if is_heron(system) else "-"] if with_trees else [])
        cells += [workload(mode, num_prompts), f"{r['tokens_per_s']:.1f}", ttft, f"{r['peak_rss_mib']:.0f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def baseline_ratios(results: Results, num_prompts: int, repeats: int) -> list[str]:
    """this tree / baseline tokens/s of each Heron cell that both trees finished, from the medians."""
    lines = []
    for (system, mode, tree), r in results.items():
        base = results.get((system, mode, "baseline"))
        if tree == "this tree" and base is not None:
            x = source_trees.ratio(r["tokens_per_s"], base["tokens_per_s"])
            lines.append(f"this tree / baseline, {system}, {workload(mode, num_prompts)}: {fmt_ratio(x)}")
    if lines:
        lines.insert(0, f"this tree / baseline, tokens/s, medians of {repeats} run(s) each (above 1: this tree is faster):")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="Heron's step token budget (default: the tree's own; give it when comparing with a "
                             "baseline whose default differs)")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="another Heron checkout: its heron runs the Heron cells too, interleaved with this tree's")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["batch", "single"], default="batch", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    if args.baseline is not None and not args.worker:
        try:
            Tree.at("baseline", args.baseline)
        except ValueError as e:
            parser.error(f"--baseline: {e}")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    source_trees.put_tree_first()  # the header's heron (kernel build, run path) is this checkout's too
    tree_list = source_trees.trees(args.baseline)

    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None

    from heron import kernels
    from heron.bench import machine_description
    from heron.models.bundled import default_chat_model_path
    from heron.models.loader import plan_run_path, resolve_device

    f32, avx2 = "heron, float32 activations", "heron, AVX2 build"
    both_builds = kernels.status().isa == "avx512"
    cells = [("heron", "batch"), (f32, "batch")] + ([(avx2, "batch")] if both_builds else []) + [("transformers", "batch")]
    cells += [("heron", "single"), (f32, "single")] + ([(avx2, "single")] if both_builds else []) + [("transformers", "single")]
    if have_llama_cpp:
        cells.append(("llama.cpp", "single"))
    results: Results = {}
    heron_files: dict[str, set[str]] = {tree.name: set() for tree in tree_list}
    for system, mode in cells:
        ran = tree_list if is_heron(system) else tree_list[:1]
        runs: dict[str, list[dict]] = {tree.name: [] for tree in ran}
        for _ in range(args.repeats):
            for tree in ran:  # A B A B: drift over the run hits both trees alike
                try:
                    result = spawn(system, mode, args, tree)
                except WrongTree as e:
                    sys.exit(f"error: {e}")
                if result:
                    runs[tree.name].append(result)
                    if is_heron(system):
                        heron_files[tree.name].add(result["heron_file"])
        for name, tree_runs in runs.items():
            if tree_runs:
                results[(system, mode, name)] = median_run(tree_runs)
        print(f"  done: {system} {mode}", file=sys.stderr)

    def ratio(a, b) -> str:
        a, b = a + ("this tree",), b + ("this tree",)
        if a in results and b in results:
            return f"{results[a]['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x"
        return "n/a"

    run_path = plan_run_path(default_chat_model_path(), args.dtype, resolve_device("cpu"))
    print(f"\nSmolLM2-135M-Instruct, dtype={args.dtype}, {args.max_tokens} tokens per request, ignore_eos, "
          f"{os.cpu_count()} CPU threads, median of {args.repeats}, "
          f"step budget {args.max_num_batched_tokens or 'each tree default'}")
    print(f"CPU: {machine_description()}")
    print(source_trees.header(tree_list, heron_files))
    print(f"Heron's default path: {run_path.describe()}\n")
    print("\n".join(results_table(results, args.num_prompts, tree_list)))
    print()
    ratios = baseline_ratios(results, args.num_prompts, args.repeats)
    if ratios:
        print("\n".join(ratios) + "\n")
    if both_builds:
        print(f"AVX-512 build / AVX2 build, batch {args.num_prompts}: {ratio(('heron', 'batch'), (avx2, 'batch'))}")
        print(f"AVX-512 build / AVX2 build, 1 stream: {ratio(('heron', 'single'), (avx2, 'single'))}")
    for name in ("heron", f32):
        label = "Heron" if name == "heron" else "Heron (float32 activations)"
        print(f"{label} / transformers, batch {args.num_prompts}: {ratio((name, 'batch'), ('transformers', 'batch'))}")
        print(f"{label} / transformers, 1 stream: {ratio((name, 'single'), ('transformers', 'single'))}")
        print(f"{label} / llama.cpp, 1 stream: {ratio((name, 'single'), ('llama.cpp', 'single'))}")


if __name__ == "__main__":
    main()
