"""GGUF files: metadata as plain Python values, tensors dequantized to torch.

Reading and dequantization are done by the `gguf` package (llama.cpp's own reader). This module
owns what Heron adds on top: metadata decoded into ordinary Python values, GGUF tensor names mapped
onto Heron's module names, and llama.cpp's Q/K row permutation undone so that the weights match the
Hugging Face layout our rotary embedding expects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
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


def _field_value(field) -> Any:
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        item_type = field.types[1] if len(field.types) > 1 else None
        if item_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if vtype == GGUFValueType.BOOL else value


class GGUFFile:
    """One GGUF file, memory-mapped: metadata now, tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = GGUFReader(str(self.path), "r")
        self.metadata: dict[str, Any] = {
            name: _field_value(field)
            for name, field in self._reader.fields.items()
            if not name.startswith("GGUF.")
        }

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A `<architecture>.<key>` metadata value, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def tensor_types(self) -> dict[str, str]:
        """Count of tensors per quantization type, e.g. {"Q4_1": 210, "F32": 61}."""
        counts: dict[str, int] = {}
        for t in self._reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self._reader.tensors)

    def iter_tensors(
        self, dtype: torch.dtype, only: set[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (GGUF name, tensor in PyTorch's [out, in] layout) one at a time, dequantized to dtype."""
        for t in self._reader.tensors:
            if only is not None and t.name not in only:
                continue
            qtype = GGMLQuantizationType(t.tensor_type)
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                # The reader's arrays view the read-only file mapping; copy before torch owns it.
                array = np.array(t.data)
            elif qtype == GGMLQuantizationType.BF16:
                # numpy has no bfloat16: the reader hands raw uint16 words.
                raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16))
                yield t.name, raw.view(torch.bfloat16).to(dtype)
                continue
            else:
                array = dequantize(t.data, qtype)
            yield t.name, torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
