"""GGUF reading and loading: Heron's GGUFFile, name mapping, Q/K un-permutation and dequantization.

Tiny GGUF files are written here with gguf-py's GGUFWriter the way llama.cpp's converter writes
them: `<arch>.*` hyperparameter keys, a byte-level BPE vocabulary, tensor names token_embd /
blk.N.attn_q / ... / output, Q and K rows permuted for the 'llama' architecture (llama.cpp's rotary
pairs adjacent dimensions, Hugging Face pairs the two halves of a head), 1-D tensors kept in F32 and
2-D ones stored as F32, F16, BF16, Q8_0, Q4_0 or Q4_1. Each file is loaded with `load_model` and its
logits compared with transformers running the weights the file was made from, in two ways:

- against the weights after the same quantize/dequantize round trip, which must agree to float
  rounding: any slip in layout, permutation, tying or name mapping shows up here;
- against the original weights, within what the storage type's precision allows.

gguf-py cannot quantize to K-quants, so Q4_K / Q5_K / Q6_K blocks are packed here by hand from the
block layouts in ggml's reference (ggml-quants.c) and read back through GGUFFile.iter_tensors.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from heron import env
from heron.models.gguf import GGUFFile, hf_tensor_name, unpermute_qk
from heron.models.layers.rotary import RotaryEmbedding
from heron.models.loader import load_model
from heron.worker.forward_batch import ForwardBatch

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------
# Name mapping and the Q/K permutation

# llama.cpp's tensor names (gguf-py's tensor_mapping) -> Hugging Face's, for decoder-only models.
GGUF_TO_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
    "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
    "blk.0.attn_v.bias": "model.layers.0.self_attn.v_proj.bias",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
    "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.17.ffn_down.weight": "model.layers.17.mlp.down_proj.weight",
    "blk.123.attn_q.weight": "model.layers.123.self_attn.q_proj.weight",
}
HF_TO_GGUF_LAYER = {
    hf.removeprefix("model.layers.0."): g.removeprefix("blk.0.")
    for g, hf in GGUF_TO_HF_NAMES.items()
    if g.startswith("blk.0.")
}
HF_TO_GGUF_GLOBAL = {hf: g for g, hf in GGUF_TO_HF_NAMES.items() if not g.startswith("blk.")}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}"


@pytest.mark.parametrize("gguf_tensor, hf_name", sorted(GGUF_TO_HF_NAMES.items()))
def test_hf_tensor_name_maps_llama_cpp_names(gguf_tensor, hf_name):
    assert hf_tensor_name(gguf_tensor) == hf_name


@pytest.mark.parametrize(
    "gguf_tensor",
    [
        "rope_freqs.weight",  # per-frequency RoPE factors: consumed by the rotary table, not a parameter
        "blk.0.attn_qkv.weight",  # fused QKV (Phi, Falcon): no Llama-family slot
        "blk.0.ffn_gate_exps.weight",  # MoE experts
        "blk.0.attn_q.scale",
        "token_embd_norm.weight",
        "blk.x.attn_q.weight",
        "",
    ],
)
def test_hf_tensor_name_returns_none_for_tensors_without_a_place(gguf_tensor):
    assert hf_tensor_name(gguf_tensor) is None


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q/K rows of 'llama' models: within each head, move the
    second half of the rows (HF's rotate-half partner of row i) to sit right after row i."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@pytest.mark.parametrize(
    "num_heads, head_dim, trailing",
    [(1, 4, (3,)), (4, 16, (64,)), (2, 16, (64,)), (9, 64, (576,)), (3, 24, ()), (5, 8, (2, 3))],
)
def test_unpermute_qk_inverts_llama_cpp_permutation(num_heads, head_dim, trailing):
    generator = torch.Generator().manual_seed(num_heads * head_dim)
    weight = torch.randn(num_heads * head_dim, *trailing, generator=generator)
    permuted = llama_cpp_permute(weight, num_heads)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, num_heads), weight)
    # The permuted layout, row by row: pairs (i, i + half) of each head become rows (2i, 2i + 1).
    half = head_dim // 2
    for head in range(num_heads):
        for i in range(half):
            base = head * head_dim
            assert torch.equal(permuted[base + 2 * i], weight[base + i])
            assert torch.equal(permuted[base + 2 * i + 1], weight[base + half + i])


def test_unpermute_qk_makes_interleaved_rope_equal_rotate_half():
    """The reason for the permutation: llama.cpp's RoPE on the permuted rows equals HF's on the
    original rows, and un-permuting the output recovers HF's result exactly."""
    num_heads, head_dim, hidden, positions = 3, 8, 12, 5
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(num_heads * head_dim, hidden, generator=generator)
    x = torch.randn(positions, hidden, generator=generator)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(positions).float()[:, None] * inv_freq  # [T, head_dim / 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    hf = (x @ weight.T).view(positions, num_heads, head_dim)
    a, b = hf.chunk(2, dim=-1)
    hf_rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    cpp = (x @ llama_cpp_permute(weight, num_heads).T).view(positions, num_heads, head_dim // 2, 2)
    even, odd = cpp[..., 0], cpp[..., 1]
    cpp_rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    cpp_rotated = cpp_rotated.reshape(positions, num_heads * head_dim)
    back = unpermute_qk(cpp_rotated.T, num_heads).T.reshape(positions, num_heads, head_dim)
    torch.testing.assert_close(back, hf_rotated)


# ---------------------------------------------------------------------------------------------
# Metadata and the tensor directory


def test_metadata_values_decode_to_python(tmp_path):
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("test.string", "héllo\nwörld 日本 😀")
    writer.add_bool("test.true", True)
    writer.add_bool("test.false", False)
    writer.add_uint8("test.u8", 255)
    writer.add_int8("test.i8", -128)
    writer.add_uint16("test.u16", 65535)
    writer.add_int16("test.i16", -32768)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -7)
    writer.add_uint64("test.u64", 2**40 + 3)
    writer.add_int64("test.i64", -(2**40))
    writer.add_float32("test.f32", 0.1)
    writer.add_float64("test.f64", 0.1)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.strings", ["a", "", "ü€", "<|im_end|>"])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_custom_alignment(64)
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.add_tensor("first.weight", tensor)
    writer.add_tensor("second.weight", np.ones(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    f = GGUFFile(path)
    m = f.metadata
    assert m["general.architecture"] == "llama" and f.architecture == "llama"
    assert m["test.string"] == "héllo\nwörld 日本 😀"
    assert m["test.true"] is True and m["test.false"] is False
    assert (m["test.u8"], m["test.i8"], m["test.u16"], m["test.i16"]) == (255, -128, 65535, -32768)
    assert (m["test.u32"], m["test.i32"]) == (4_000_000_000, -7)
    assert (m["test.u64"], m["test.i64"]) == (2**40 + 3, -(2**40))
    assert m["test.f32"] == pytest.approx(0.1, rel=1e-7) and m["test.f32"] != 0.1  # stored as float32
    assert m["test.f64"] == 0.1
    assert m["test.ints"] == [1, -2, 3]
    assert m["test.floats"] == [0.5, -1.25]
    assert m["test.strings"] == ["a", "", "ü€", "<|im_end|>"]
    assert m["test.bools"] == [True, False, True]
    assert m["test.nested"] == [[1, 2], [3]]
    assert f.arch_value("missing", "fallback") == "fallback"
    # The tensor directory: PyTorch-order shapes, types, data found past the custom alignment.
    assert f.tensor_names == ["first.weight", "second.weight"]
    assert [t.shape for t in f.tensors] == [(3, 4), (5,)]
    assert f.tensor_types() == {"F32": 1, "F16": 1}
    assert f.num_parameters == 17
    assert all(t.offset % 64 == 0 for t in f.tensors)
    tensors = dict(f.iter_tensors(torch.float32))
    assert torch.equal(tensors["first.weight"], torch.from_numpy(tensor))
    assert torch.equal(tensors["second.weight"], torch.ones(5))
    [(name, only)] = list(f.iter_tensors(torch.bfloat16, only={"second.weight"}))
    assert name == "second.weight" and only.dtype == torch.bfloat16


def test_files_that_are_not_gguf_v2_or_later_are_refused(tmp_path):
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(not_gguf)
    version_1 = tmp_path / "old.gguf"
    version_1.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(ValueError, match="version 1"):
        GGUFFile(version_1)


# ---------------------------------------------------------------------------------------------
# K-quant blocks packed by hand

QK_K = 256  # values per K-quant super-block


def pack_q4k_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The 12 bytes holding eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4):
    bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of scales / mins
    4-7 in their high 2 bits; bytes 8-11 hold the low 4 bits of scale 4+j and of min 4+j."""
    out = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        out[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        out[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        out[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4)
    return out


def pack_q4k_block(d: float, dmin: float, scales, mins, q) -> tuple[bytes, np.ndarray]:
    """One Q4_K block (f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes) and its values.

    Sub-block j (32 values) is d * scales[j] * q - dmin * mins[j]; each 64-value chunk c keeps
    sub-block 2c in the low nibbles of its 32 bytes and sub-block 2c + 1 in the high nibbles."""
    q = np.asarray(q, dtype=np.uint8)
    qs = np.zeros(128, dtype=np.uint8)
    for c in range(4):
        qs[32 * c : 32 * c + 32] = q[64 * c : 64 * c + 32] | (q[64 * c + 32 : 64 * c + 64] << 4)
    raw = np.float16(d).tobytes() + np.float16(dmin).tobytes() + pack_q4k_scales(scales, mins).tobytes() + qs.tobytes()
    return raw, _k_values(d, dmin, scales, mins, q, 32)


def pack_q5k_block(d: float, dmin: float, scales, mins, q) -> tuple[bytes, np.ndarray]:
    """One Q5_K block: as Q4_K, plus 32 bytes whose bit j of byte l is the fifth bit of value l of
    sub-block j (stored between the scales and the nibbles)."""
    q = np.asarray(q, dtype=np.uint8)
    low = q & 0x0F
    qs = np.zeros(128, dtype=np.uint8)
    qh = np.zeros(32, dtype=np.uint8)
    for c in range(4):
        qs[32 * c : 32 * c + 32] = low[64 * c : 64 * c + 32] | (low[64 * c + 32 : 64 * c + 64] << 4)
    for j in range(8):
        qh |= ((q[32 * j : 32 * j + 32] >> 4) & 1) << j
    raw = (
        np.float16(d).tobytes()
        + np.float16(dmin).tobytes()
        + pack_q4k_scales(scales, mins).tobytes()
        + qh.tobytes()
        + qs.tobytes()
    )
    return raw, _k_values(d, dmin, scales, mins, q, 32)


def pack_q6k_block(d: float, scales, q) -> tuple[bytes, np.ndarray]:
    """One Q6_K block (128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, f16 d last).

    Value p is d * scales[p // 16] * q[p] with q in [-32, 32), stored as q + 32 in 6 bits. Each
    128-value half n is four 32-value rows k: rows 0/1 take the low nibbles of low bytes 64n.. /
    64n+32.., rows 2/3 their high nibbles; bits 2k..2k+1 of high byte 32n + l hold the top bits."""
    u = np.asarray(q, dtype=np.int16) + 32
    ql = np.zeros(128, dtype=np.uint8)
    qh = np.zeros(64, dtype=np.uint8)
    for p in range(QK_K):
        n, k, l = p // 128, (p % 128) // 32, p % 32
        ql[64 * n + 32 * (k % 2) + l] |= (u[p] & 0x0F) << (4 * (k // 2))
        qh[32 * n + l] |= (u[p] >> 4) << (2 * k)
    raw = ql.tobytes() + qh.tobytes() + np.asarray(scales, dtype=np.int8).tobytes() + np.float16(d).tobytes()
    values = np.float32(np.float16(d)) * np.repeat(np.asarray(scales, np.float32), 16) * np.asarray(q, np.float32)
    return raw, values


def _k_values(d, dmin, scales, mins, q, sub_block: int) -> np.ndarray:
    d32, dmin32 = np.float32(np.float16(d)), np.float32(np.float16(dmin))
    sc = np.repeat(np.asarray(scales, np.float32), sub_block)
    mn = np.repeat(np.asarray(mins, np.float32), sub_block)
    return d32 * sc * np.asarray(q, np.float32) - dmin32 * mn


def write_raw_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, QType]]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (raw, qtype) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_k_blocks(qtype: QType, num_blocks: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    raws, values = [], []
    for _ in range(num_blocks):
        d, dmin = rng.uniform(0.001, 0.05), rng.uniform(0.001, 0.05)
        if qtype == QType.Q6_K:
            raw, v = pack_q6k_block(d, rng.integers(-128, 128, 16), rng.integers(-32, 32, QK_K))
        else:
            # Full 6-bit scales and mins, so the high bits packed into bytes 0-7 matter.
            scales, mins = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
            top = 16 if qtype == QType.Q4_K else 32
            pack = pack_q4k_block if qtype == QType.Q4_K else pack_q5k_block
            raw, v = pack(d, dmin, scales, mins, rng.integers(0, top, QK_K))
        raws.append(raw)
        values.append(v)
    return raws, np.concatenate(values)


@pytest.mark.parametrize("qtype, block_bytes", [(QType.Q4_K, 144), (QType.Q5_K, 176), (QType.Q6_K, 210)])
@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 256), (256,)])
def test_k_quant_tensors_dequantize_to_the_values_packed(tmp_path, qtype, block_bytes, shape):
    num_blocks = int(np.prod(shape)) // QK_K
    raws, values = random_k_blocks(qtype, num_blocks, seed=sum(shape) + qtype.value)
    assert all(len(raw) == block_bytes for raw in raws)
    # Bytes laid out as the tensor's rows: [..., blocks per row * block bytes].
    raw = np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(*shape[:-1], -1)
    path = tmp_path / "k.gguf"
    write_raw_tensors(path, {"blk.0.ffn_down.weight": (raw, qtype)})
    f = GGUFFile(path)
    assert f.tensors[0].shape == shape and f.tensors[0].qtype == qtype
    assert f.tensors[0].num_bytes == num_blocks * block_bytes
    [(name, tensor)] = list(f.iter_tensors(torch.float32))
    assert name == "blk.0.ffn_down.weight" and tensor.shape == shape and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(values.reshape(shape)), rtol=1e-6, atol=1e-7)


def test_q4_k_block_with_constant_nibbles_by_hand(tmp_path):
    # Every sub-block: scale 3, min 2, nibble 7 -> 0.5 * 3 * 7 - 0.25 * 2 = 10.
    # Second block: scales 40 / mins 20 (above 15: their top bits live in bytes 0-7), nibble 1
    # -> 0.125 * 40 * 1 - 0.0625 * 20 = 3.75.
    first, _ = pack_q4k_block(0.5, 0.25, [3] * 8, [2] * 8, [7] * QK_K)
    second, _ = pack_q4k_block(0.125, 0.0625, [40] * 8, [20] * 8, [1] * QK_K)
    assert first[4:8] == bytes([3, 3, 3, 3]) and first[20:24] == b"\x77\x77\x77\x77"
    raw = np.frombuffer(first + second, dtype=np.uint8).reshape(1, -1)
    path = tmp_path / "q4k.gguf"
    write_raw_tensors(path, {"w": (raw, QType.Q4_K)})
    [(_, tensor)] = list(GGUFFile(path).iter_tensors(torch.float32))
    assert tensor.shape == (1, 512)
    assert torch.equal(tensor[0, :256], torch.full((256,), 10.0))
    assert torch.equal(tensor[0, 256:], torch.full((256,), 3.75))


def test_q6_k_block_by_hand(tmp_path):
    # Scale s for sub-block s - 8 (-8..7), q cycling -32..31: value = 0.5 * scale * q.
    scales = np.arange(-8, 8)
    q = (np.arange(QK_K) % 64) - 32
    raw, _ = pack_q6k_block(0.5, scales, q)
    path = tmp_path / "q6k.gguf"
    write_raw_tensors(path, {"w": (np.frombuffer(raw, dtype=np.uint8).reshape(1, -1), QType.Q6_K)})
    [(_, tensor)] = list(GGUFFile(path).iter_tensors(torch.float32))
    expected = 0.5 * torch.from_numpy(np.repeat(scales, 16) * q).float()
    assert torch.equal(tensor[0], expected)


# ---------------------------------------------------------------------------------------------
# Whole models: write a GGUF the way llama.cpp does, load it with Heron, compare with transformers


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> character table: printable bytes as themselves, the rest from U+0100 up."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"]
EOS = "<|endoftext|>"
TOKENS = [*gpt2_byte_alphabet(), *(m.replace(" ", "") for m in MERGES), EOS]
VOCAB_SIZE = len(TOKENS)  # 267

TINY = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=VOCAB_SIZE - 1,
    eos_token_id=VOCAB_SIZE - 1,
    tie_word_embeddings=False,
)

# case -> (GGUF architecture, transformers class, config overrides)
MODELS = {
    "llama": ("llama", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}),
    "llama-tied": ("llama", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-rope-linear": (
        "llama",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "llama-rope-yarn": (
        "llama",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}},
    ),
    # llama.cpp stores Llama 3.1's scaling as a rope_freqs tensor of per-frequency divisors.
    "llama-rope-llama3": (
        "llama",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            }
        },
    ),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"head_dim": 24}),
}
SEQUENCE_LENGTHS = (5, 60, 150)


def build_reference(architecture: str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model with every parameter redrawn: norms around one, biases non-zero,
    logits of order one (transformers' own init would hide a lost norm or bias)."""
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**{**TINY, **overrides})
    model = getattr(transformers, architecture)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


def storage_type(tensor: torch.Tensor, qtype: QType) -> QType:
    # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type.
    return qtype if tensor.dim() == 2 else QType.F32


def round_trip(tensor: torch.Tensor, qtype: QType) -> torch.Tensor:
    """The tensor as the file will give it back."""
    data = gguf.quants.quantize(tensor.numpy(), qtype)
    if qtype in (QType.F32, QType.F16):
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(tensor.shape)


def write_model_gguf(path: Path, arch: str, model: torch.nn.Module, qtype: QType) -> None:
    config = model.config
    rope = dict(config.rope_parameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope["rope_type"] == "llama3":
        # The divisor of each base frequency, i.e. base inv_freq / scaled inv_freq.
        scaled, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        writer.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (VOCAB_SIZE - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(VOCAB_SIZE - 1)
    writer.add_eos_token_id(VOCAB_SIZE - 1)
    writer.add_add_bos_token(False)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied models have no output tensor: llama.cpp reuses token_embd
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            tensor = llama_cpp_permute(tensor, heads)
        array = tensor.float().numpy()
        stored = storage_type(tensor, qtype)
        data = gguf.quants.quantize(array, stored)
        if stored in (QType.F32, QType.F16):
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_tripped_reference(model: torch.nn.Module, qtype: QType) -> torch.nn.Module:
    """A copy of the model holding the weights exactly as the GGUF file stores them."""
    if qtype == QType.F32:
        return model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.parameters():
            param.copy_(round_trip(param.detach(), storage_type(param, qtype)))
    return twin


@torch.inference_mode()
def logits_per_sequence(loaded, sequences):
    logits = loaded.model.compute_logits(loaded.model(ForwardBatch.for_sequences(sequences)))
    return logits.split([len(s) for s in sequences])


@torch.inference_mode()
def reference_logits(model, sequences):
    return torch.cat([model(torch.tensor([s])).logits[0] for s in sequences])


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=generator).tolist() for n in SEQUENCE_LENGTHS]


@pytest.fixture(scope="module")
def references():
    """One transformers model per case, built once."""
    return {case: build_reference(architecture, overrides) for case, (_, architecture, overrides) in MODELS.items()}


def load_written(tmp_path, references, case: str, qtype: QType):
    arch, architecture, _ = MODELS[case]
    reference = references[case]
    path = tmp_path / f"{case}-{qtype.name}.gguf"
    write_model_gguf(path, arch, reference, qtype)
    # Float32 activations: these tests check what is read from the file, which the CPU kernels'
    # default int8 activations would blur (tests/unit/test_cpu_kernels.py covers those).
    with env.override(cpu_int8=False):
        loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    assert loaded.source_format == "gguf"
    assert loaded.arch_config.architecture == architecture
    return loaded, reference


# Stored type -> (bound on the logits' relative RMS error against the original weights, least top-1
# agreement). Logits of scale ~3 from weights of std 0.1; measured: F16 8e-4, BF16 7e-3, Q8_0 0.02,
# Q4_x 0.3 (about 3-4x each type's per-weight error), agreement 0.99 / 0.99 / 0.98 / 0.6 (a random
# model's top logits are often near-ties). A file read wrongly is uncorrelated: relative error ~1.4.
# Against the round-tripped weights every type is exact (ROUND_TRIP_ATOL).
QUANT_TOLERANCES = {
    QType.F32: (1e-6, 1.0),
    QType.F16: (2e-3, 0.97),
    QType.BF16: (1.5e-2, 0.97),
    QType.Q8_0: (4e-2, 0.93),
    QType.Q4_1: (0.5, 0.45),
    QType.Q4_0: (0.5, 0.45),
}
ROUND_TRIP_ATOL = 1e-4


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCES), ids=lambda q: q.name)
def test_llama_gguf_in_each_storage_type_matches_transformers(tmp_path, references, sequences, qtype):
    loaded, reference = load_written(tmp_path, references, "llama", qtype)
    stored = GGUFFile(loaded.source).tensor_types()
    # 16 matrices (7 per layer, embedding, output) and 5 norms.
    assert stored == ({"F32": 21} if qtype == QType.F32 else {qtype.name: 16, "F32": 5})
    ours = torch.cat(logits_per_sequence(loaded, sequences))

    exact = reference_logits(round_tripped_reference(reference, qtype), sequences)
    exact_diff = (ours - exact).abs().max().item()
    original = reference_logits(reference, sequences)
    diff = (ours - original).abs().max().item()
    relative = ((ours - original).norm() / original.norm()).item()
    agreement = (ours.argmax(-1) == original.argmax(-1)).float().mean().item()
    print(
        f"\nGGUF llama {qtype.name}: max |diff| vs stored weights {exact_diff:.3g}; vs original weights "
        f"max |diff| {diff:.3g} (scale {original.abs().max():.2f}), relative RMS {relative:.2g}, top-1 agree {agreement:.3f}"
    )
    assert exact_diff <= ROUND_TRIP_ATOL
    max_relative, min_agreement = QUANT_TOLERANCES[qtype]
    assert relative <= max_relative
    assert agreement >= min_agreement
    if qtype == QType.F32:
        assert diff <= 1e-4


@pytest.mark.parametrize("case", [c for c in MODELS if c != "llama"])
def test_gguf_architectures_and_rope_variants_match_transformers(tmp_path, references, sequences, case):
    loaded, reference = load_written(tmp_path, references, case, QType.F32)
    config = loaded.arch_config
    assert config.tie_word_embeddings == (case == "llama-tied")
    assert config.head_dim == MODELS[case][2].get("head_dim", 16)
    assert config.vocab_size == VOCAB_SIZE and config.max_position_embeddings == 256
    rope_type = MODELS[case][2].get("rope_parameters", {}).get("rope_type", "default")
    if rope_type in ("linear", "yarn"):
        assert config.rope_scaling["rope_type"] == rope_type
    else:
        # llama3 scaling arrives as the rope_freqs tensor, not as metadata.
        assert config.rope_scaling is None
    plain = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
    same_tables = torch.equal(plain.cos_cache, loaded.model.rotary.cos_cache)
    assert same_tables == (rope_type == "default")
    for seq, ours in zip(sequences, logits_per_sequence(loaded, sequences)):
        ref = reference_logits(reference, [seq])
        diff = (ours - ref).abs().max().item()
        print(f"\nGGUF {case} F32, {len(seq)} tokens: max |diff| {diff:.3g}")
        assert diff <= 1e-4
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case, qtype", [("qwen2", QType.Q8_0), ("qwen3", QType.Q4_1)], ids=["qwen2-Q8_0", "qwen3-Q4_1"])
def test_unpermuted_architectures_quantized_match_stored_weights(tmp_path, references, sequences, case, qtype):
    # Qwen files are not Q/K-permuted: quantized Q/K must still load row for row.
    loaded, reference = load_written(tmp_path, references, case, qtype)
    ours = torch.cat(logits_per_sequence(loaded, sequences))
    exact = reference_logits(round_tripped_reference(reference, qtype), sequences)
    diff = (ours - exact).abs().max().item()
    print(f"\nGGUF {case} {qtype.name}: max |diff| vs stored weights {diff:.3g}")
    assert diff <= ROUND_TRIP_ATOL


def test_gguf_metadata_reaches_config_and_tokenizer(tmp_path, references):
    loaded, _ = load_written(tmp_path, references, "llama", QType.Q8_0)
    config = loaded.arch_config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.rope_theta == 50000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.eos_token_ids == (VOCAB_SIZE - 1,)
    assert loaded.eos_token_ids == (VOCAB_SIZE - 1,)
    assert loaded.quantization.startswith("Q8_0 (16)")
    tokenizer = loaded.tokenizer
    text = "in the rest of the state"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # The merges were applied: " the" is one token, "Ġthe".
    assert TOKENS.index("Ġthe") in ids and len(ids) < len(text.encode())
