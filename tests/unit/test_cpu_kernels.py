"""Heron's CPU kernels against references: quantized linear layers against float64 products of
gguf-py's dequantized weights (float32 activations), or of activations quantized per 32-value
block as the int8 path defines it (int8 activations), paged decode attention against PyTorch's
SDPA over gathered K/V, and the fused norm / activation / RoPE steps against PyTorch's. Also: a row's
result does not depend on the batch around it (the engine's batched = alone promise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from heron import env, kernels
from heron.cpu_info import CpuInfo

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need x86-64 with AVX2/FMA/F16C and a C compiler")

QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def make_blocks(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [n, k] weights quantized by gguf-py: (blocks uint8 [n, row bytes], dequantized float32 [n, k])."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    blocks = quantize(w, GGMLQuantizationType[qtype])
    return torch.from_numpy(blocks.copy()), torch.from_numpy(dequantize(blocks, GGMLQuantizationType[qtype]).copy())


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows_dequantize_exactly_as_gguf_py(qtype):
    blocks, reference = make_blocks(qtype, 37, 96)
    rows = torch.tensor([0, 36, 5, 5, 17])
    got = kernels.quant_rows(blocks, qtype, 96, rows)
    assert torch.equal(got, reference[rows])


def packed(qtype: str, n: int, k: int, seed: int = 0, int8: bool = False) -> tuple[kernels.PackedWeight, torch.Tensor]:
    blocks, w = make_blocks(qtype, n, k, seed)
    return kernels.pack_blocks(blocks, qtype, n, k, int8=int8), w


def block_fields(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's scale d and offset m (w = d q + m; Q4_0: m = -8 d; Q8_0: m = 0), float32 [n, k / 32]."""
    blocks, _ = make_blocks(qtype, n, k, seed)
    blk = blocks.reshape(n, k // 32, -1)
    d = blk[..., 0:2].contiguous().view(torch.float16).float().reshape(n, k // 32)
    if qtype == "Q4_1":
        return d, blk[..., 2:4].contiguous().view(torch.float16).float().reshape(n, k // 32)
    return d, -8 * d if qtype == "Q4_0" else torch.zeros_like(d)


def int8_reference(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What the int8 path defines, in float64: each 32-value block of a row quantized to
    round(x / s) with s = amax / 127 (float32 arithmetic, ties to even), times d q; plus m times the
    block's float sum of x."""
    rows, k = x.shape
    xb = x.reshape(rows, k // 32, 32)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    xq = torch.round(xb * inv)
    assert xq.abs().max() <= 127
    x_hat = (xq.double() * scale.double()).reshape(rows, k)
    m_full = m.double().repeat_interleave(32, dim=1)
    return (x_hat @ (w.double() - m_full).t() + x.double() @ m_full.t()).float()


SHAPES = [
    (1, 64, 32),  # one block per row; the single-token path
    (1, 44, 96),  # single token, N not a multiple of the 8-row panel nor of 4 panels
    (2, 10, 64),  # N not a multiple of 8: a zero-padded panel
    (5, 24, 544),  # an odd number of panels; K past the 256-wide scratch, ragged last chunk
    (200, 8, 64),  # more tokens than one 96-token block (and than 8 tiles of 4)
    (13, 33, 160),  # tiles of 6 (and of 4) tokens and a remainder
]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_packed_linear_matches_float64_product(qtype, m, n, k):
    w_packed, w = packed(qtype, n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = kernels.packed_linear(x, w_packed)
    expected = (x.double() @ w.double().t()).float()
    assert got.shape == (m, n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * k**0.5)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int8_linear_matches_its_definition_and_stays_near_the_float_product(qtype, m, n, k):
    w_packed, w = packed(qtype, n, k, seed=m + n + k, int8=True)
    assert w_packed.int8
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    x[0, :32] = 0.0  # an all-zero activation block (scale 0)
    got = kernels.packed_linear(x, w_packed)
    assert got.shape == (m, n)
    _, offsets = block_fields(qtype, n, k, seed=m + n + k)
    torch.testing.assert_close(got, int8_reference(x, w, offsets), rtol=1e-5, atol=2e-5 * k**0.5)
    # What quantizing the activations costs: about 1% of the product's size.
    exact = x.double() @ w.double().t()
    assert (got.double() - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int8_linear_4_bit_sums_do_not_saturate(qtype):
    # The largest 4-bit value against activations quantized to +127 everywhere: the 16-bit sums of a
    # block reach 30480, just under 2^15.
    n, k = 8, 64
    blocks, _ = make_blocks(qtype, n, k)
    blk = blocks.reshape(n, k // 32, -1).clone()
    start = 4 if qtype == "Q4_1" else 2
    blk[..., start : start + 16] = 0xFF
    blocks = blk.reshape(n, -1)
    w = torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType[qtype]).copy())
    x = torch.ones(3, k)
    got = kernels.packed_linear(x, kernels.pack_blocks(blocks, qtype, n, k, int8=True))
    torch.testing.assert_close(got, (x.double() @ w.double().t()).float(), rtol=1e-6, atol=1e-5)


def test_int8_linear_takes_q8_0_weights_of_minus_128():
    # gguf-py never writes -128, but a file may: |w| = 128 must not wrap.
    n, k = 8, 32
    blocks, _ = make_blocks("Q8_0", n, k, seed=3)
    blocks = blocks.clone()
    blocks[:, 2:34] = torch.tensor([-128, 127, -127, 1] * 8, dtype=torch.int8).view(torch.uint8)
    w = torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType.Q8_0).copy())
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2))
    got = kernels.packed_linear(x, kernels.pack_blocks(blocks, "Q8_0", n, k, int8=True))
    torch.testing.assert_close(got, int8_reference(x, w, torch.zeros(n, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_packed_linear_reads_strided_rows(int8):
    w_packed, w = packed("Q4_1", 16, 64, int8=int8)
    wide = torch.randn(6, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    assert torch.equal(kernels.packed_linear(x, w_packed), kernels.packed_linear(x.contiguous(), w_packed))
    torch.testing.assert_close(kernels.packed_linear(x, w_packed), x @ w.t(), rtol=0.03, atol=0.03 if int8 else 1e-5)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("qtype", QTYPES)
def test_a_row_gives_the_same_bits_in_any_batch(qtype, int8):
    w_packed, _ = packed(qtype, 40, 1056, int8=int8)
    x = torch.randn(131, 1056, generator=torch.Generator().manual_seed(1))
    together = kernels.packed_linear(x, w_packed)
    for row in (0, 1, 2, 5, 6, 95, 96, 97, 130):
        alone = kernels.packed_linear(x[row : row + 1], w_packed)
        assert torch.equal(alone[0], together[row]), row
    for start, stop in ((95, 97), (3, 10), (90, 131)):
        assert torch.equal(kernels.packed_linear(x[start:stop], w_packed), together[start:stop])


def test_int8_activations_are_the_default_and_the_environment_turns_them_off():
    assert env.EnvSettings.from_env({}).cpu_int8 and not env.EnvSettings.from_env({"HERON_CPU_INT8": "0"}).cpu_int8
    blocks, _ = make_blocks("Q4_1", 8, 32)
    with env.override(cpu_int8=True):
        assert kernels.int8_activations() and kernels.pack_blocks(blocks, "Q4_1", 8, 32).int8
    with env.override(cpu_int8=False):
        assert not kernels.int8_activations() and not kernels.pack_blocks(blocks, "Q4_1", 8, 32).int8


@pytest.mark.parametrize("int8", [False, True])
def test_packed_linear_rejects_k_not_a_multiple_of_32(int8):
    w_packed, _ = packed("Q8_0", 4, 64, int8=int8)
    bad = kernels.PackedWeight("Q8_0", w_packed.q, w_packed.d, None, 4, 48, int8)
    with pytest.raises(ValueError, match="K=48"):
        kernels.packed_linear(torch.randn(2, 48), bad)


@pytest.mark.parametrize("int8", [False, True])
def test_packed_linear_with_no_rows(int8):
    w_packed, _ = packed("Q8_0", 4, 64, int8=int8)
    assert kernels.packed_linear(torch.randn(0, 64), w_packed).shape == (0, 4)


def test_packing_keeps_the_weights_smaller_than_float32():
    w_packed, _ = packed("Q4_1", 64, 256)
    assert w_packed.nbytes * 5 < 64 * 256 * 4  # 6 bits a weight (4-bit values, float32 scale and min)


def sdpa_reference(q, k_cache, v_cache, slots, lens, scale):
    out = []
    for b in range(q.shape[0]):
        s = slots[b, : lens[b]]
        k = k_cache[s].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        v = v_cache[s].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q[b][None, :, None, :], k, v, scale=scale, enable_gqa=True)
        out.append(o[0, :, 0, :])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 32), (8, 2, 128), (2, 1, 80)],
)
def test_paged_decode_attention_matches_sdpa(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_slots = 400
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    lens = torch.tensor([1, 17, 150, 33, 64])
    max_len = int(lens.max())
    # Each sequence's positions live in scattered slots, as blocks of a paged cache do.
    perm = torch.randperm(num_slots, generator=gen)
    slots = torch.zeros(len(lens), max_len, dtype=torch.int64)
    for b, length in enumerate(lens.tolist()):
        slots[b, :length] = perm[b * 70 : b * 70 + length] if length <= 70 else perm[:length]
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3
    scale = head_dim**-0.5
    got = kernels.paged_decode_attention(q, k_cache, v_cache, slots, lens, scale)
    torch.testing.assert_close(got, sdpa_reference(q, k_cache, v_cache, slots, lens, scale), rtol=1e-5, atol=1e-5)
    # Alone or with the others: the same bits.
    alone = kernels.paged_decode_attention(q[2:3], k_cache, v_cache, slots[2:3], lens[2:3], scale)
    assert torch.equal(alone[0], got[2])


def test_paged_attention_of_a_prefill_chunk_is_causal_and_each_row_is_its_decode():
    # A chunk of 37 tokens after 20 cached ones: every row reads one shared slot list up to itself.
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim = 9, 3, 64
    k_cache = torch.randn(100, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(100, kv_heads, head_dim, generator=gen)
    slots = torch.randperm(100, generator=gen)[:57]
    q = torch.randn(37, heads, head_dim, generator=gen)
    lens = torch.arange(21, 58)
    got = kernels.paged_decode_attention(q, k_cache, v_cache, slots, lens, 0.125)
    k = k_cache[slots].transpose(0, 1).unsqueeze(0)
    v = v_cache[slots].transpose(0, 1).unsqueeze(0)
    mask = torch.ones(37, 57, dtype=torch.bool).tril(20)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(got, expected[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    for row in (0, 17, 36):  # the same bits as that token decoding with its own slot row
        alone = kernels.paged_decode_attention(q[row : row + 1], k_cache, v_cache, slots[None, : lens[row]], lens[row : row + 1], 0.125)
        assert torch.equal(alone[0], got[row])
    with pytest.raises(ValueError, match="covering every length"):
        kernels.paged_decode_attention(q, k_cache, v_cache, slots[:40], lens, 0.125)


def test_paged_decode_attention_takes_a_strided_query():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(50, 2, 16, generator=gen)
    v_cache = torch.randn(50, 2, 16, generator=gen)
    qkv = torch.randn(3, 4 * 16 + 2 * 2 * 16, generator=gen)
    q = qkv[:, : 4 * 16].view(3, 4, 16)
    slots = torch.arange(30).view(3, 10)
    lens = torch.tensor([10, 4, 7])
    got = kernels.paged_decode_attention(q, k_cache, v_cache, slots, lens, 0.25)
    torch.testing.assert_close(got, sdpa_reference(q, k_cache, v_cache, slots, lens, 0.25), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_writes_into_out_and_refuses_a_strided_one():
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(20, 2, 16, generator=gen), torch.randn(20, 2, 16, generator=gen)
    q = torch.randn(2, 4, 16, generator=gen)
    slots, lens = torch.arange(20).view(2, 10), torch.tensor([10, 3])
    out = torch.zeros(3, 4, 16)
    got = kernels.paged_decode_attention(q, k_cache, v_cache, slots, lens, 0.25, out=out[:2])
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:2], sdpa_reference(q, k_cache, v_cache, slots, lens, 0.25), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros(4, 16))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_decode_attention(q, k_cache, v_cache, slots, lens, 0.25, out=torch.zeros(2, 16, 4).transpose(1, 2))


def test_paged_decode_attention_rejects_head_dim_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="head_dim=12"):
        kernels.paged_decode_attention(torch.randn(1, 2, 12), torch.randn(4, 2, 12), torch.randn(4, 2, 12), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([2]), 1.0)


def test_add_rms_norm_adds_in_place_and_normalises():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen) * 4
    delta = torch.randn(5, 64, generator=gen)
    weight = torch.rand(64, generator=gen) + 0.5
    expected_x = x + delta
    expected = F.rms_norm(expected_x, (64,), weight, 1e-5)
    got = kernels.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Without a delta x is left alone.
    before = x.clone()
    torch.testing.assert_close(kernels.add_rms_norm(x, None, weight, 1e-5), F.rms_norm(x, (64,), weight, 1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


def test_silu_mul_matches_torch_across_the_range():
    gate = torch.cat([torch.linspace(-120, 120, 241), torch.randn(15)])  # 256 values, saturating ends included
    up = torch.randn(256, generator=torch.Generator().manual_seed(4))
    gate_up = torch.cat([gate, up]).view(1, 512).repeat(3, 1)
    got = kernels.silu_mul(gate_up)
    torch.testing.assert_close(got, (F.silu(gate) * up).expand(3, -1), rtol=2e-6, atol=1e-6)


def test_rotary_rotates_q_and_k_heads_in_place_and_leaves_v():
    from heron.models.layers.rotary import RotaryEmbedding, apply_rotary

    rope = RotaryEmbedding(32, 64, 10000.0)
    heads, kv_heads, d = 4, 2, 32
    qkv = torch.randn(6, (heads + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([0, 1, 7, 63, 2, 2])
    cos, sin = rope.lookup(positions, torch.float32)
    q = qkv[:, : heads * d].view(6, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(6, kv_heads, d)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    kernels.rotary_(qkv, heads + kv_heads, d, positions, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(qkv[:, : heads * d].view(6, heads, d), expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, heads * d : (heads + kv_heads) * d].view(6, kv_heads, d), expected_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)


def test_the_kernel_ops_rotate_normed_heads_and_projection_views_to_the_table_lookups_bits():
    # Qwen3 rotates fresh (normed) Q/K tensors, Llama views into the fused projection; both with the
    # kernel, which must then give apply_rotary's bits exactly, not merely close ones.
    from heron.models.arch_config import ArchConfig
    from heron.models.layers.decoder_ops import CpuKernelOps, DecoderOps
    from heron.models.layers.rotary import RotaryEmbedding

    config = ArchConfig("Qwen3ForCausalLM", 64, 128, 256, 1, 4, 2, 32)
    rope = RotaryEmbedding(32, 512, 10000.0)
    kernel_ops = DecoderOps.choose(config, torch.device("cpu"), torch.float32, rope)
    assert isinstance(kernel_ops, CpuKernelOps)
    torch_ops = DecoderOps(config, torch.float32)
    positions = torch.tensor([0, 3, 511, 17, 17, 200])
    qkv = torch.randn(6, 8 * 32, generator=torch.Generator().manual_seed(6))

    def views(t):
        return t[:, : 4 * 32].view(6, 4, 32), t[:, 4 * 32 : 6 * 32].view(6, 2, 32)

    want = torch_ops.rotate(*views(qkv), torch_ops.rope_inputs(rope, positions))
    fused = qkv.clone()
    for q, k in (views(fused), (views(qkv)[0].contiguous(), views(qkv)[1].contiguous())):
        got = kernel_ops.rotate(q, k, kernel_ops.rope_inputs(rope, positions))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(fused[:, 6 * 32 :], qkv[:, 6 * 32 :])  # V untouched
    with pytest.raises(ValueError, match="heads must lie contiguous"):
        q, k = views(qkv.clone())
        kernel_ops.rotate(q.transpose(1, 2), k, kernel_ops.rope_inputs(rope, positions))


# -- the kernel builds: AVX-512 VNNI and AVX2 give the same bits -------------------------------


def avx512_build() -> dict:
    """How to run the AVX-512 build here: natively where the CPU has it, else its code compiled
    against SIMDe's portable intrinsics (the same source, emulated on AVX2: slow, exact)."""
    if "avx512" in CpuInfo.read().kernel_isas:
        return {"isa": "avx512"}
    import simde_py

    return {"isa": "avx512", "emulate_with": simde_py.get_include()}


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES + [(70, 40, 1056), (9, 17, 64)])  # tiles of 8 tokens and remainders
def test_avx512_int8_linear_gives_the_avx2_bits(qtype, m, n, k):
    w_packed, _ = packed(qtype, n, k, seed=3 * m + n + k, int8=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k))
    with kernels.using("avx2"):
        want = kernels.packed_linear(x, w_packed)
    with kernels.using(**avx512_build()):
        assert kernels.status().isa.startswith("avx512")
        got = kernels.packed_linear(x, w_packed)
    assert torch.equal(got, want)


def test_avx512_int8_linear_takes_q8_0_weights_of_minus_128_and_zero():
    n, k = 16, 64
    blocks, _ = make_blocks("Q8_0", n, k)
    blocks = blocks.reshape(n, k // 32, 34)
    blocks[:, :, 2:34] = torch.tensor([-128, 127, -127, 1, 0, 0, -1, 64] * 4, dtype=torch.int8).view(torch.uint8)
    w_packed = kernels.pack_blocks(blocks.reshape(n, -1), "Q8_0", n, k, int8=True)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(7))
    with kernels.using("avx2"):
        want = kernels.packed_linear(x, w_packed)
    with kernels.using(**avx512_build()):
        assert torch.equal(kernels.packed_linear(x, w_packed), want)


def test_using_switches_builds_and_restores_the_default():
    default = kernels.status()
    with kernels.using(None):
        assert not kernels.available() and kernels.status().isa is None
        with kernels.using("avx2"):
            assert kernels.available() and kernels.status().isa == "avx2"
        assert not kernels.available()
    assert kernels.status() == default and kernels.available()


def test_using_refuses_a_build_this_cpu_cannot_run():
    if "avx512" in CpuInfo.read().kernel_isas:
        pytest.skip("this CPU runs every build")
    with pytest.raises(RuntimeError, match="cannot run the avx512 build"):
        with kernels.using("avx512"):
            pass


def test_each_build_is_cached_under_its_own_name(tmp_path):
    with env.override(cache_dir=tmp_path):
        path = kernels.build("avx2")
        assert path.parent == tmp_path and "-avx2-" in path.name and kernels.build("avx2") == path


def test_a_cached_build_needs_no_compiler(tmp_path, monkeypatch):
    # The Docker image compiles the kernels in its build stage and ships no compiler.
    with env.override(cache_dir=tmp_path):
        path = kernels.build("avx2")
        monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
        with env.override(cc=None):
            assert kernels.build("avx2") == path
        with env.override(cache_dir=tmp_path / "empty", cc=None), pytest.raises(RuntimeError, match="no C compiler"):
            kernels.build("avx2")


@pytest.mark.parametrize(
    "environ,want",
    [({"HERON_CPU_ISA": "avx2"}, "avx2"), ({"HERON_CPU_KERNELS": "0"}, "None"), ({"HERON_CPU_ISA": "auto"}, None)],
)
def test_the_environment_picks_the_build_a_process_runs(environ, want):
    import os
    import subprocess
    import sys

    best = CpuInfo.read().kernel_isas[0]
    proc = subprocess.run(
        [sys.executable, "-c", "from heron import kernels; print(kernels.status().isa)"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HERON_CPU")}, **environ},
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout.strip() == (want or best)
