"""The paths off the default: a bf16 model on a CPU, and what the README promises for it.

Asked for with `dtype="bfloat16"`, the bundled GGUF model still runs its Q4_1/Q8_0 matrices through
Heron's kernels (float32 in, cast back), while norms, attention and the residual stream are bf16 in
PyTorch. The README promises replay for this path (the same request alone, or the same batch, gives
the same tokens again) but not batch invariance; these tests hold it to the first.
"""

from __future__ import annotations

import pytest
import torch

from heron import kernels
from heron.config import CacheConfig, SchedulerConfig
from heron.engine.core import EngineCore
from heron.models.loader import load_model
from heron.sampling_params import SamplingParams

PROMPTS = ["The history of the printing press", "def fibonacci(n):", "Dear hiring committee,", "Q: What is 2 + 2?\nA:"]


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(None, dtype="bfloat16", progress=False)


def generate(loaded, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    core = EngineCore(loaded, CacheConfig(kv_cache_memory_bytes=32 << 20), SchedulerConfig(), 2048)
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", loaded.tokenizer.encode(prompt), params)
    done = {}
    while core.has_unfinished():
        for output in core.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.skipif(not kernels.available(), reason="needs Heron's CPU kernels")
def test_a_bf16_model_runs_its_quantized_matrices_through_the_kernels(bf16_model):
    assert bf16_model.dtype == torch.bfloat16
    assert bf16_model.run_path.quantized_kernels and bf16_model.run_path.dtype_reason == "asked for"
    assert bf16_model.model.model.embed_tokens.packed is not None
    assert bf16_model.model.model.norm.weight.dtype == torch.bfloat16
    assert "matrices run from their" in bf16_model.quantization


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_bf16_replays_alone_and_in_the_same_batch(bf16_model, params):
    alone = [generate(bf16_model, [p], params)[0] for p in PROMPTS[:2]]
    assert [generate(bf16_model, [p], params)[0] for p in PROMPTS[:2]] == alone
    batch = generate(bf16_model, PROMPTS, params)
    assert generate(bf16_model, PROMPTS, params) == batch
    assert all(len(tokens) == 16 for tokens in batch)
