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
Usage: python benchmarks/throughput.py [--num-prompts 64] [--max-tokens 128] [--dtype auto]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

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

    llm = LLM(dtype=args.dtype, max_num_seqs=max(args.num_prompts, 1), progress=False)
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


def worker_main(args) -> None:
    result = WORKERS[args.worker](args)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result))


def spawn(system: str, mode: str, args) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", system, "--mode", mode,
        "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(f"{system} ({mode}) failed:\n{proc.stderr[-2000:]}\n")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["batch", "single"], default="batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

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
    results: dict[tuple[str, str], dict] = {}
    for system, mode in cells:
        runs = [r for r in (spawn(system, mode, args) for _ in range(args.repeats)) if r]
        if runs:
            runs.sort(key=lambda r: r["tokens_per_s"])
            results[(system, mode)] = runs[len(runs) // 2]
        print(f"  done: {system} {mode}", file=sys.stderr)

    def ratio(a, b) -> str:
        if a in results and b in results:
            return f"{results[a]['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x"
        return "n/a"

    run_path = plan_run_path(default_chat_model_path(), args.dtype, resolve_device("cpu"))
    print(f"\nSmolLM2-135M-Instruct, dtype={args.dtype}, {args.max_tokens} tokens per request, ignore_eos, "
          f"{os.cpu_count()} CPU threads, median of {args.repeats}")
    print(f"CPU: {machine_description()}")
    print(f"Heron's default path: {run_path.describe()}\n")
    print("| system | workload | tokens/s | TTFT | peak RSS |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (system, mode), r in results.items():
        workload = f"{args.num_prompts} prompts together" if mode == "batch" else "1 stream (decode)"
        ttft = f"{r['ttft_s'] * 1000:.0f} ms" if "ttft_s" in r else "-"
        print(f"| {system} | {workload} | {r['tokens_per_s']:.1f} | {ttft} | {r['peak_rss_mib']:.0f} MiB |")
    print()
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
