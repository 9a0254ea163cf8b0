"""GGUF files: metadata as plain Python values, tensors dequantized to torch.

The header (metadata and tensor directory) is parsed here: gguf-py's GGUFReader builds a numpy view
per array element and takes seconds on a 49k-token vocabulary, where this takes a fraction of one.
Dequantization (F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants, ...) is left to the `gguf` package,
llama.cpp's own reference. This module also maps GGUF tensor names onto Heron's module names and
undoes llama.cpp's Q/K row permutation so the weights match the Hugging Face rotary layout.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

# Heron's parameter names (Hugging Face's) for each GGUF tensor name of a decoder-only model.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to Heron's (Hugging Face) parameter name; None when it has no place."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half halves)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: [out, in] for a matrix (GGUF lists dims reversed)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int


class _HeaderReader:
    """Little-endian reads over the mapped file, front to back."""

    def __init__(self, buffer: mmap.mmap):
        self.buffer = buffer
        self.pos = 0

    def scalar(self, code: str) -> Any:
        value = struct.unpack_from("<" + code, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buffer, self.pos)
        start = self.pos + 8
        self.pos = start + length
        return self.buffer[start : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("I"))
            count = self.scalar("Q")
            if item_type in _SCALARS:
                # One bulk unpack: token score/type arrays hold ~10^5 items.
                code = _SCALARS[item_type]
                values = list(struct.unpack_from(f"<{count}{code}", self.buffer, self.pos))
                self.pos += struct.calcsize(code) * count
                return values
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALARS[vtype])


class GGUFFile:
    """One GGUF file, memory-mapped: metadata now, tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = _HeaderReader(self._mmap)
        if self._mmap[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        reader.pos = 4
        version = reader.scalar("I")
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (need 2 or later)")
        num_tensors = reader.scalar("Q")
        num_fields = reader.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_fields):
            key = reader.string()
            self.metadata[key] = reader.value(GGUFValueType(reader.scalar("I")))
        entries = []
        for _ in range(num_tensors):
            name = reader.string()
            dims = [reader.scalar("Q") for _ in range(reader.scalar("I"))]
            qtype = GGMLQuantizationType(reader.scalar("I"))
            entries.append((name, dims, qtype, reader.scalar("Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-reader.pos // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        for name, dims, qtype, offset in entries:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            num_elements = int(np.prod(dims)) if dims else 1
            self.tensors.append(
                GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, num_elements // block_size * type_size)
            )
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A `<architecture>.<key>` metadata value, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def tensor_types(self) -> dict[str, int]:
        """Count of tensors per quantization type, e.g. {"Q4_1": 210, "F32": 61}."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    def raw_blocks(self, t: GGUFTensorInfo) -> torch.Tensor:
        """A quantized matrix's GGML blocks as uint8 [rows, bytes per row] (a copy, not the mapping)."""
        raw = self._data[t.offset : t.offset + t.num_bytes]
        return torch.from_numpy(raw.reshape(t.shape[0], -1).copy())

    def iter_tensors(self, dtype: torch.dtype, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (GGUF name, tensor in PyTorch's [out, in] layout) one at a time, dequantized to dtype."""
        for t in self.tensors:
            if only is not None and t.name not in only:
                continue
            raw = self._data[t.offset : t.offset + t.num_bytes]
            if t.qtype == GGMLQuantizationType.BF16:
                # numpy has no bfloat16: reinterpret the raw 16-bit words in torch.
                words = torch.from_numpy(raw.view(np.int16).copy())
                yield t.name, words.view(torch.bfloat16).reshape(t.shape).to(dtype)
                continue
            if t.qtype == GGMLQuantizationType.F32:
                array = raw.view(np.float32).copy()  # copy: the mapping is read-only
            elif t.qtype == GGMLQuantizationType.F16:
                array = raw.view(np.float16).copy()
            else:
                # gguf's dequantize works on rows of whole blocks: [rows, bytes per row].
                num_rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
                array = dequantize(raw.reshape(num_rows, -1), t.qtype)
            yield t.name, torch.from_numpy(array).reshape(t.shape).to(dtype)
