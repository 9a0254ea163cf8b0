"""The attention backends (heron.worker.attention) against each other and a float64 reference.

One float32 step mixes decodes, a prefill chunk after cached context and a prefill without context,
with random block tables over a random cache: SDPA matches the reference, and the CPU paged kernel
matches SDPA (skipped where Heron's kernels do not run) and gives a sequence the same bits alone as
in the batch. A cache-free batch (ForwardBatch.for_sequences) is causal within each sequence.
"""

from __future__ import annotations

import pytest
import torch

from heron import kernels
from heron.worker.attention import AttentionLayer, CpuPagedBackend, SdpaBackend, choose_backend
from heron.worker.forward_batch import ForwardBatch

LAYER = AttentionLayer(num_heads=4, num_kv_heads=2, head_dim=32)
BLOCK_SIZE = 4
NUM_BLOCKS = 48
# Three decodes, then a chunk of 9 after 11 cached tokens, then a prompt of 13 with nothing cached.
QUERY_LENS = [1, 1, 1, 9, 13]
CONTEXT_LENS = [5, 17, 1, 11, 0]

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need x86-64 with AVX2/FMA/F16C and a C compiler")


def make_step(seed: int, query_lens=QUERY_LENS, context_lens=CONTEXT_LENS, num_decodes: int = 3):
    """(batch, q, k, v, kv_cache): random tensors, block tables drawn from a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    block_tables, positions, slot_mapping = [], [], []
    for num_new, num_context in zip(query_lens, context_lens):
        # One spare block past the end, as a sequence about to grow holds.
        num_blocks = -(-(num_context + num_new) // BLOCK_SIZE) + 1
        table, pool = pool[:num_blocks], pool[num_blocks:]
        block_tables.append(table)
        for p in range(num_context, num_context + num_new):
            positions.append(p)
            slot_mapping.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    num_tokens = sum(query_lens)
    h, hkv, d = LAYER.num_heads, LAYER.num_kv_heads, LAYER.head_dim
    q = torch.randn(num_tokens, h, d, generator=gen)
    k = torch.randn(num_tokens, hkv, d, generator=gen)
    v = torch.randn(num_tokens, hkv, d, generator=gen)
    # Every slot holds something: the context's K/V, and values no sequence may read.
    kv_cache = (torch.randn(NUM_BLOCKS * BLOCK_SIZE, hkv, d, generator=gen), torch.randn(NUM_BLOCKS * BLOCK_SIZE, hkv, d, generator=gen))
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.long),
        positions=torch.tensor(positions),
        logits_indices=torch.arange(num_tokens),
        query_lens=list(query_lens),
        context_lens=list(context_lens),
        num_decodes=num_decodes,
        block_tables=block_tables,
        block_size=BLOCK_SIZE,
        kv_caches=[kv_cache],
        slot_mapping=torch.tensor(slot_mapping),
    )
    return batch, q, k, v, kv_cache


def run(backend, batch, q, k, v, kv_cache):
    """The backend's output, on copies of the cache (returned too)."""
    cache = None if kv_cache is None else (kv_cache[0].clone(), kv_cache[1].clone())
    out = backend.forward(LAYER, q, k, v, cache, backend.build_metadata(batch))
    return out, cache


def reference(batch, q, k, v, kv_cache) -> torch.Tensor:
    """Each new token over its sequence's positions 0 .. its own, in float64, one token at a time."""
    group = LAYER.num_heads // LAYER.num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    start = 0
    for i, (num_new, num_context) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if kv_cache is None:  # the sequence's own new K/V
            keys, values = k[start : start + num_new], v[start : start + num_new]
        else:
            # Context from the cache as it was, then this step's new tokens.
            table = batch.block_tables[i]
            slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(num_context)]
            keys = torch.cat([kv_cache[0][slots], k[start : start + num_new]])
            values = torch.cat([kv_cache[1][slots], v[start : start + num_new]])
        keys = keys.double().repeat_interleave(group, dim=1)  # [L, H, D]
        values = values.double().repeat_interleave(group, dim=1)
        for j in range(num_new):
            seen = num_context + j + 1
            scores = torch.einsum("hd,lhd->hl", q[start + j].double(), keys[:seen]) * LAYER.scale
            out[start + j] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values[:seen])
        start += num_new
    return out.view(q.shape[0], -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_matches_the_reference_on_a_mixed_step(seed):
    batch, q, k, v, kv_cache = make_step(seed)
    out, cache = run(SdpaBackend(), batch, q, k, v, kv_cache)
    torch.testing.assert_close(out.double(), reference(batch, q, k, v, kv_cache), rtol=0, atol=1e-5)
    # The new tokens' K/V landed in their slots, and nothing else moved.
    expected_k = kv_cache[0].clone().index_copy_(0, batch.slot_mapping, k)
    assert torch.equal(cache[0], expected_k)


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_paged_matches_sdpa_on_a_mixed_step(seed):
    batch, q, k, v, kv_cache = make_step(seed)
    paged, paged_cache = run(CpuPagedBackend(), batch, q, k, v, kv_cache)
    sdpa, sdpa_cache = run(SdpaBackend(), batch, q, k, v, kv_cache)
    torch.testing.assert_close(paged, sdpa, rtol=0, atol=1e-5)
    assert torch.equal(paged_cache[0], sdpa_cache[0]) and torch.equal(paged_cache[1], sdpa_cache[1])


@needs_kernels
def test_cpu_paged_gives_a_sequence_the_same_bits_alone_as_in_the_batch():
    batch, q, k, v, kv_cache = make_step(2)
    together, _ = run(CpuPagedBackend(), batch, q, k, v, kv_cache)
    starts = [0, 1, 2, 3, 12, 25]
    for i in (1, 3, 4):  # a decode, the chunk after context, the prompt
        rows = slice(starts[i], starts[i + 1])
        alone = ForwardBatch(
            input_ids=batch.input_ids[rows],
            positions=batch.positions[rows],
            logits_indices=torch.arange(rows.stop - rows.start),
            query_lens=[batch.query_lens[i]],
            context_lens=[batch.context_lens[i]],
            num_decodes=int(i < 3),
            block_tables=[batch.block_tables[i]],
            block_size=BLOCK_SIZE,
            kv_caches=batch.kv_caches,
            slot_mapping=batch.slot_mapping[rows],
        )
        out, _ = run(CpuPagedBackend(), alone, q[rows], k[rows], v[rows], kv_cache)
        assert torch.equal(out, together[rows])


@pytest.mark.parametrize("backend", [SdpaBackend, pytest.param(CpuPagedBackend, marks=needs_kernels)])
def test_a_cache_free_batch_is_causal_within_each_sequence(backend):
    sequences = [[1] * 6, [2] * 17, [3]]
    batch = ForwardBatch.for_sequences(sequences)
    assert batch.query_lens == [6, 17, 1] and batch.context_lens == [0, 0, 0] and batch.kv_caches is None
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(24, LAYER.num_heads, LAYER.head_dim, generator=gen)
    k = torch.randn(24, LAYER.num_kv_heads, LAYER.head_dim, generator=gen)
    v = torch.randn(24, LAYER.num_kv_heads, LAYER.head_dim, generator=gen)
    out, _ = run(backend(), batch, q, k, v, None)
    torch.testing.assert_close(out.double(), reference(batch, q, k, v, None), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", [SdpaBackend, CpuPagedBackend])
def test_a_cache_free_batch_with_cached_context_is_refused(backend):
    batch = ForwardBatch.for_sequences([[1, 2, 3]])
    batch.context_lens = [4]
    with pytest.raises(ValueError, match="cache-free batch cannot have cached context"):
        backend().build_metadata(batch)


def test_the_paged_kernel_runs_float32_on_a_cpu_that_has_it_and_sdpa_elsewhere():
    cpu = torch.device("cpu")
    expected = CpuPagedBackend if kernels.available() else SdpaBackend
    assert type(choose_backend(cpu, torch.float32, 64)) is expected
    assert type(choose_backend(cpu, torch.bfloat16, 64)) is SdpaBackend
    assert type(choose_backend(cpu, torch.float32, 12)) is SdpaBackend  # the kernel takes multiples of 8
    assert type(choose_backend(torch.device("cuda"), torch.float32, 64)) is SdpaBackend
    with kernels.using(None):
        assert type(choose_backend(cpu, torch.float32, 64)) is SdpaBackend
