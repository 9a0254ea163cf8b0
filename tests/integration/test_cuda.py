"""CUDA checks: model parity and the paged engine on a GPU. Skipped where no GPU is present.

Tiny random-weight Llama and Qwen3 checkpoints are written by transformers into a temp dir (with the
bundled MiniLM tokenizer files, so nothing is downloaded), loaded through Heron onto the GPU and
compared with transformers there; then the engine's paged attention runs on the GPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tiny_checkpoint(path, tokenizer_dir, family: str) -> None:
    import transformers

    common = dict(
        vocab_size=30522,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=102,
        bos_token_id=101,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**common, head_dim=48)
        model = transformers.Qwen3ForCausalLM(config)
    torch.manual_seed(0)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)


@pytest.fixture(scope="module")
def tokenizer_dir():
    # GPU machines may lack the bundled model packages: a copied tokenizer folder will do.
    if "HERON_TEST_TOKENIZER_DIR" in os.environ:
        return Path(os.environ["HERON_TEST_TOKENIZER_DIR"])
    from heron.models.bundled import default_embedding_model_path

    return default_embedding_model_path()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp(request.param)
    _tiny_checkpoint(path, tokenizer_dir, request.param)
    return path


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-3), ("bfloat16", 0.15)])
def test_logits_match_transformers_on_cuda(checkpoint, dtype, atol):
    import transformers

    from heron.models.loader import load_model
    from heron.worker.forward_batch import ForwardBatch

    torch.backends.cuda.matmul.allow_tf32 = False
    loaded = load_model(checkpoint, dtype=dtype, device="cuda", progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).cuda().eval()
    torch.manual_seed(1)
    sequences = [torch.randint(0, 30522, (n,)).tolist() for n in (7, 64, 200)]
    with torch.inference_mode():
        batch = ForwardBatch.for_sequences(sequences, device="cuda")
        logits = loaded.model.compute_logits(loaded.model(batch))
        start = 0
        for seq in sequences:
            ref = reference(torch.tensor([seq], device="cuda")).logits[0].float()
            ours = logits[start : start + len(seq)]
            start += len(seq)
            assert (ours - ref).abs().max().item() <= atol
            assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


def test_paged_engine_on_cuda_matches_alone_and_full_forward(checkpoint):
    from heron.config import CacheConfig, SchedulerConfig
    from heron.engine.core import EngineCore
    from heron.models.loader import load_model
    from heron.sampling_params import SamplingParams
    from heron.worker.forward_batch import ForwardBatch

    loaded = load_model(checkpoint, dtype="float32", device="cuda", progress=False)
    torch.manual_seed(2)
    prompts = [torch.randint(1000, 30000, (n,)).tolist() for n in (5, 17, 40, 90, 33, 64)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)

    def run(core, batch_prompts):
        for i, p in enumerate(batch_prompts):
            core.add_request(f"r{i}", p, params)
        done = {}
        while core.has_unfinished():
            for out in core.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return [done[f"r{i}"] for i in range(len(batch_prompts))]

    small = CacheConfig(kv_cache_memory_bytes=64 << 20)
    together = run(EngineCore(loaded, small, SchedulerConfig(max_num_batched_tokens=64)), prompts)
    for prompt, out in zip(prompts, together):
        alone = run(EngineCore(loaded, small), [prompt])[0]
        assert alone.token_ids == out.token_ids
        # The paged path's logprobs equal a cache-free forward over the whole sequence.
        with torch.inference_mode():
            full = prompt + out.token_ids
            logits = loaded.model.compute_logits(loaded.model(ForwardBatch.for_sequences([full], device="cuda")))
            expected = logits.log_softmax(-1)[len(prompt) - 1 : len(full) - 1]
        got = torch.tensor([lp.logprob for lp in out.logprobs], device="cuda")
        want = expected.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        assert torch.allclose(got, want, atol=1e-3)
