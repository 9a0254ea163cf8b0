"""Layers receiving GGUF blocks (QuantizedTensor): the shards a Linear refuses to mix, and shapes that
do not fit. None of this needs the compiled kernels: it is the loading bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from heron.models.layers.linear import Linear
from heron.models.layers.quantized import Embedding, QuantizedTensor


def shard(qtype: str, rows: int, cols: int) -> QuantizedTensor:
    w = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    return QuantizedTensor(qtype, torch.from_numpy(quantize(w, GGMLQuantizationType[qtype]).copy()), (rows, cols))


def test_linear_keeps_quantized_shards_and_packs_them():
    linear = Linear(64, 24)
    linear.load_shard("weight", shard("Q4_1", 16, 64), 0)
    linear.load_shard("weight", shard("Q4_1", 8, 64), 16)
    assert linear.weight.numel() == 0  # the float storage is freed
    linear.pack()
    assert linear.qweight is None and linear.packed.out_features == 24 and linear.packed.qtype == "Q4_1"


def test_linear_refuses_a_float_shard_after_a_quantized_one():
    linear = Linear(64, 24)
    linear.load_shard("weight", shard("Q8_0", 16, 64), 0)
    with pytest.raises(ValueError, match="float weight shard at offset 16"):
        linear.load_shard("weight", torch.zeros(8, 64), 16)


def test_linear_refuses_a_quantized_shard_after_a_float_one():
    linear = Linear(64, 24)
    linear.load_shard("weight", torch.zeros(16, 64), 0)
    with pytest.raises(ValueError, match="whose other shards are float"):
        linear.load_shard("weight", shard("Q8_0", 8, 64), 16)


def test_linear_refuses_two_quantization_types():
    linear = Linear(64, 24)
    linear.load_shard("weight", shard("Q8_0", 16, 64), 0)
    with pytest.raises(ValueError, match="Q4_0 weight shard .* whose other shards are Q8_0"):
        linear.load_shard("weight", shard("Q4_0", 8, 64), 16)


@pytest.mark.parametrize(("rows", "cols", "offset"), [(16, 96, 0), (16, 64, 16)])
def test_linear_refuses_a_quantized_shard_that_does_not_fit(rows, cols, offset):
    with pytest.raises(ValueError, match="does not fit"):
        Linear(64, 24).load_shard("weight", shard("Q8_0", rows, cols), offset)


def test_embedding_refuses_a_table_of_another_shape():
    with pytest.raises(ValueError, match="does not fit"):
        Embedding(10, 64).load_quantized(shard("Q8_0", 12, 64))
