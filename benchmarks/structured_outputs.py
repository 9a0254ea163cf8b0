"""What constrained decoding costs: the mask per token, and the slowdown of a batch around it.

1. Mask overhead per token. For each kind of constraint, a valid output is tokenized and walked one
   token at a time through the engine's own pieces: `GrammarBitmask.start()` + `wait()` + `unpack_bitmask` (llguidance
   fills the packed mask on its worker thread, then it is unpacked to a bool row) and the sampler's
   masking of one logits row. Timed per token, median and p99, beside the median time of one decode
   step of a 16-request batch, so the overhead reads as a fraction of a step.
2. Batch slowdown. 16 requests decode together on the bundled SmolLM2-135M through EngineCore:
   once all unconstrained, once with one of them under a JSON Schema it cannot finish within the
   budget (so it stays constrained for every step). The figure is the decoding speed of the other
   15 (their generated tokens over the wall time), constrained run against plain run. The two runs
   alternate, `--repeats` times each, and the medians are compared. ignore_eos makes every request
   produce exactly `--max-tokens` tokens, so both runs do the same work but for the mask.

Usage: python benchmarks/structured_outputs.py [--max-tokens 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from heron.config import CacheConfig, SchedulerConfig
from heron.engine.core import EngineCore
from heron.models.loader import load_model
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.structured.bitmask import GrammarBitmask
from heron.worker.sampler import Sampler, SamplingRow, unpack_bitmask

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
TOOLS_REQUIRED = {
    "type": "array",
    "minItems": 1,
    "items": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_time"},
                    "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        ]
    },
}
# (name, spec, a valid output to walk)
CASES = [
    (
        "json_schema (nested object)",
        StructuredOutputsParams(json=PERSON),
        json.dumps(
            {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "poetry"],
             "address": {"city": "London", "zip": "12345"}},
        ),
    ),
    ("json_object", StructuredOutputsParams(json_object=True), '{"answer": 4, "explanation": "two plus two is four"}'),
    ("tool_choice required (2 tools)", StructuredOutputsParams(json=TOOLS_REQUIRED), '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'),
    ("regex (ISO date + time)", StructuredOutputsParams(regex=r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}"), "1969-07-20T20:17"),
    ("choice (3 strings)", StructuredOutputsParams(choice=["positive", "negative", "neutral"]), "negative"),
]
# A constraint the model cannot satisfy within the budget: it stays constrained every step.
ENDLESS = StructuredOutputsParams(
    json={"type": "array", "minItems": 200, "items": {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}, "required": ["city", "population"]}}
)
WORDS = "the river carries light across old stones while birds argue about the weather near the harbour".split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mask_overhead(core: EngineCore, repeats: int) -> list[tuple[str, int, float, float, float, float]]:
    tokenizer = core.tokenizer
    vocab = core.loaded.arch_config.vocab_size
    masks = GrammarBitmask(vocab)
    sampler_rows = []
    results = []
    for name, spec, text in CASES:
        compiled = core.grammar_compiler.compile(spec)
        walk = tokenizer.encode(text, add_special_tokens=False)
        mask_us: list[float] = []
        apply_us: list[float] = []
        for _ in range(repeats):
            matcher = compiled.matcher()
            for token in walk + [core.eos_token_ids[0]]:
                start = time.perf_counter()
                row = unpack_bitmask(masks.wait(masks.start([matcher])), vocab)[0]
                mid = time.perf_counter()
                logits = torch.randn(1, vocab)
                sampler_rows = [SamplingRow(SamplingParams(temperature=0), [], [], core.eos_token_ids, None, row)]
                t0 = time.perf_counter()
                chosen = Sampler()(logits, sampler_rows).token_ids[0]
                t1 = time.perf_counter()
                assert row[chosen], "the sampler picked a token the mask forbids"
                assert row[token], f"{name}: the mask refuses the valid output at {tokenizer.decode([token])!r}"
                mask_us.append((mid - start) * 1e6)
                apply_us.append((t1 - t0) * 1e6)
                matcher.consume_token(token)
        # The sampler's own time without a mask, to isolate what masking adds.
        plain_us = []
        for _ in range(len(apply_us)):
            logits = torch.randn(1, vocab)
            t0 = time.perf_counter()
            Sampler()(logits, [SamplingRow(SamplingParams(temperature=0), [], [], core.eos_token_ids, None, None)])
            plain_us.append((time.perf_counter() - t0) * 1e6)
        results.append(
            (
                name,
                len(walk),
                statistics.median(mask_us),
                percentile(mask_us, 0.99),
                statistics.median(apply_us) - statistics.median(plain_us),
                statistics.median(plain_us),
            )
        )
    masks.close()
    return results


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 3 + j * 5) % len(WORDS)] for j in range(12 + i % 7)]
        out.append(tokenizer.encode(f"Story {i}: " + " ".join(words), add_special_tokens=False))
    return out


def run_batch(core: EngineCore, batch: list[list[int]], max_tokens: int, constrained: bool) -> tuple[float, list[float]]:
    """Wall seconds of the whole batch, and the duration of each decode-only step."""
    plain = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(batch):
        params = plain
        if constrained and i == 0:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=ENDLESS)
        core.add_request(f"r{i}", prompt, params)
    step_times = []
    start = time.perf_counter()
    while core.has_unfinished():
        t0 = time.perf_counter()
        outputs = core.step()
        if len(outputs) == len(batch):  # every request advanced: a full decode step (or the prefill)
            step_times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, step_times[1:]  # the first is the prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    loaded = load_model(None, progress=False)
    core = EngineCore(loaded, CacheConfig(kv_cache_memory_bytes=256 << 20), SchedulerConfig(max_num_seqs=args.batch))
    batch = prompts(core.tokenizer, args.batch)
    core.grammar_compiler.compile(ENDLESS)  # compiled before timing, as the server does before submitting
    run_batch(core, batch[:4], 4, True)  # warm-up: first-touch allocations, the mask thread

    plain_walls, constrained_walls, plain_steps = [], [], []
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        wall, steps = run_batch(core, batch, args.max_tokens, constrained=False)
        plain_walls.append(wall)
        plain_steps.extend(steps)
        wall, _ = run_batch(core, batch, args.max_tokens, constrained=True)
        constrained_walls.append(wall)
    others_tokens = (args.batch - 1) * args.max_tokens
    plain_speed = others_tokens / statistics.median(plain_walls)
    constrained_speed = others_tokens / statistics.median(constrained_walls)
    step_ms = statistics.median(plain_steps) * 1e3

    print(f"## Mask overhead per token (SmolLM2 vocabulary {loaded.arch_config.vocab_size:,}; {torch.get_num_threads()} torch threads)\n")
    print("| constraint | tokens walked | mask µs (median) | mask µs (p99) | sampler masking µs | share of a decode step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, num_tokens, median, p99, apply, _plain in mask_overhead(core, args.repeats):
        share = (median + apply) / (step_ms * 1e3)
        print(f"| {name} | {num_tokens} | {median:,.0f} | {p99:,.0f} | {apply:,.0f} | {share:.2%} |")
    print(f"\nMedian decode step of the plain {args.batch}-request batch: {step_ms:.1f} ms. The mask is computed on a "
          "worker thread while the model runs; only the sampler masking is on the step's critical path.\n")
    print(f"## Batch slowdown: {args.batch} requests x {args.max_tokens} tokens, one of them constrained (median of {args.repeats})\n")
    print("| run | wall s (median) | the other 15: tokens/s | vs plain |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| all plain | {statistics.median(plain_walls):.2f} | {plain_speed:.1f} | 1.000 |")
    print(f"| 1 of {args.batch} under a JSON Schema | {statistics.median(constrained_walls):.2f} | {constrained_speed:.1f} | {constrained_speed / plain_speed:.3f} |")
    print(f"\nSlowdown of the unconstrained requests: {(1 - constrained_speed / plain_speed):.1%} (target: under 10%).")


if __name__ == "__main__":
    main()
