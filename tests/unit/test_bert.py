"""Parity of Heron's BERT encoder and pooling with transformers on the bundled all-MiniLM-L6-v2.

Heron runs sequences packed end to end with no padding; transformers runs the same sentences as a
padded batch with an attention mask. Only real token positions are compared.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer

from heron.models.bert import BertModel, _AttentionPlan
from heron.models.pooling import Pooler, PoolingConfig, UnsupportedPoolingConfig

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "Hi!",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn. " * 13,
    "Le modèle produit des plongements de phrases à partir de textes français.",
    "深度学习模型可以把句子转换成向量。",
    "Привет, как дела? Это тестовое предложение.",
    "Embeddings power semantic search.",
]


def _iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # Local stand-in for heron.models.loader.iter_safetensors: one tensor at a time.
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _load_heron(model_dir: Path, dtype: torch.dtype = torch.float32) -> BertModel:
    config = json.loads((model_dir / "config.json").read_text())
    model = BertModel(config).to(dtype).eval()
    model.load_weights(_iter_safetensors(model_dir))
    return model


def _pack(token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    seq_lens = [len(ids) for ids in token_ids]
    input_ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    return input_ids, positions, seq_lens


@pytest.fixture(scope="module")
def tokenizer(minilm_dir) -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    # The bundled tokenizer.json pads and truncates to 128; the model serves up to 256 tokens.
    tok.no_padding()
    tok.enable_truncation(256)
    return tok


@pytest.fixture(scope="module")
def token_ids(tokenizer) -> list[list[int]]:
    ids = [enc.ids for enc in tokenizer.encode_batch(SENTENCES)]
    lens = [len(x) for x in ids]
    assert min(lens) <= 5 and 180 <= max(lens) <= 256, lens  # short and long inputs both present
    return ids


@pytest.fixture(scope="module")
def heron_model(minilm_dir) -> BertModel:
    return _load_heron(minilm_dir)


@pytest.fixture(scope="module")
def hf_model(minilm_dir):
    return transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf_reference(hf_model, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    return _hf_padded(hf_model, token_ids)


def _hf_padded(hf_model, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' padded last hidden states and attention mask for `token_ids`."""
    max_len = max(len(x) for x in token_ids)
    input_ids = torch.zeros(len(token_ids), max_len, dtype=torch.long)
    mask = torch.zeros(len(token_ids), max_len, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    with torch.inference_mode():
        hidden = hf_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden, mask


@pytest.fixture(scope="module")
def heron_hidden(heron_model, token_ids) -> torch.Tensor:
    input_ids, positions, seq_lens = _pack(token_ids)
    with torch.inference_mode():
        return heron_model(input_ids, positions, seq_lens)


def _unpad(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[mask.bool()]


def test_packed_hidden_states_match_transformers(heron_hidden, hf_reference, token_ids):
    ref_hidden, mask = hf_reference
    total = sum(len(x) for x in token_ids)
    assert heron_hidden.shape == (total, 384)
    assert heron_hidden.dtype == torch.float32
    max_diff = (heron_hidden - _unpad(ref_hidden, mask)).abs().max().item()
    assert max_diff <= 1e-4, max_diff


def test_mixed_batch_runs_reordered_length_buckets(token_ids):
    # On CPU the encoder sorts sequences into length buckets; make sure the parity test above really
    # goes through the reordering and the masked (unequal-length) bucket path.
    lens = [len(x) for x in token_ids]
    plan = _AttentionPlan.build(lens, torch.device("cpu"))
    assert len(plan.buckets) >= 2
    assert any(bucket.key_mask is not None for bucket in plan.buckets)
    assert [b.start for b in plan.buckets[1:]] == [b.end for b in plan.buckets[:-1]]
    assert plan.buckets[-1].end == sum(lens)
    assert plan.token_order is not None and plan.inverse_order is not None
    assert torch.equal(plan.token_order[plan.inverse_order], torch.arange(sum(lens)))


def test_many_length_buckets_match_transformers(heron_model, hf_model):
    # Lengths chosen to give several buckets: equal-length ones (no mask) and padded ones, in an
    # order that is not sorted. Token ids are arbitrary vocabulary entries between [CLS] and [SEP].
    lens = [250, 7, 180, 64, 64, 33, 120, 90, 3, 17, 200]
    generator = torch.Generator().manual_seed(0)
    token_ids = [
        [101] + torch.randint(1000, 29000, (n - 2,), generator=generator).tolist() + [102]
        for n in lens
    ]
    plan = _AttentionPlan.build(lens, torch.device("cpu"))
    assert len(plan.buckets) >= 3
    assert any(bucket.key_mask is None for bucket in plan.buckets)

    ref_hidden, mask = _hf_padded(hf_model, token_ids)
    with torch.inference_mode():
        hidden = heron_model(*_pack(token_ids))
    max_diff = (hidden - _unpad(ref_hidden, mask)).abs().max().item()
    assert max_diff <= 1e-4, max_diff


def test_each_sequence_is_independent_of_its_batch(heron_model, heron_hidden, token_ids):
    # Attention must not leak across packed neighbours: a sentence run alone gives the same states.
    offset = sum(len(x) for x in token_ids[:3])
    alone_ids, alone_pos, alone_lens = _pack([token_ids[3]])
    with torch.inference_mode():
        alone = heron_model(alone_ids, alone_pos, alone_lens)
    in_batch = heron_hidden[offset : offset + alone_lens[0]]
    assert (alone - in_batch).abs().max().item() <= 1e-5


def test_equal_length_batch_matches_mixed_batch(heron_model, tokenizer):
    # Equal lengths take the no-scatter path; it must agree with the padded-grid path.
    ids = [enc.ids for enc in tokenizer.encode_batch(["one two three", "four five six"])]
    assert len(ids[0]) == len(ids[1])
    longer = tokenizer.encode("a somewhat longer sentence than the others").ids
    with torch.inference_mode():
        equal = heron_model(*_pack(ids))
        mixed = heron_model(*_pack(ids + [longer]))
    assert (equal - mixed[: equal.shape[0]]).abs().max().item() <= 1e-5


def test_explicit_zero_token_types_equal_default(heron_model, token_ids):
    input_ids, positions, seq_lens = _pack(token_ids[:3])
    with torch.inference_mode():
        default = heron_model(input_ids, positions, seq_lens)
        explicit = heron_model(input_ids, positions, seq_lens, torch.zeros_like(input_ids))
    assert torch.allclose(default, explicit, atol=1e-6)


def test_pooled_embeddings_match_manual_mean_pool(
    minilm_dir, heron_hidden, hf_reference, token_ids
):
    ref_hidden, mask = hf_reference
    pooler = Pooler(PoolingConfig.from_sentence_transformers_dir(minilm_dir))
    embeddings = pooler(heron_hidden, [len(x) for x in token_ids])

    weights = mask[..., None].to(ref_hidden.dtype)
    reference = (ref_hidden * weights).sum(1) / weights.sum(1)
    assert embeddings.shape == (len(SENTENCES), 384)
    assert embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    cosine = F.cosine_similarity(embeddings, reference, dim=-1)
    assert cosine.min().item() >= 0.99999, cosine


def test_bf16_model_stays_close_to_fp32(minilm_dir, heron_hidden, token_ids):
    model = _load_heron(minilm_dir, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seq_lens = [len(x) for x in token_ids]
    with torch.inference_mode():
        hidden = model(*_pack(token_ids))
    assert hidden.dtype == torch.bfloat16
    pooler = Pooler(PoolingConfig(mode="mean", normalize=True, max_seq_length=256, dimension=384))
    cosine = F.cosine_similarity(pooler(hidden, seq_lens), pooler(heron_hidden, seq_lens), dim=-1)
    assert cosine.min().item() >= 0.999, cosine


def test_load_weights_rejects_missing_weight(minilm_dir):
    model = BertModel(json.loads((minilm_dir / "config.json").read_text()))
    dropped = "encoder.layer.3.attention.self.key.weight"
    weights = ((n, t) for n, t in _iter_safetensors(minilm_dir) if n != dropped)
    with pytest.raises(ValueError, match=r"missing weights: layers\.3\.qkv\.weight\[k\]"):
        model.load_weights(weights)


def test_load_weights_rejects_unexpected_weight_and_accepts_bert_prefix(minilm_dir):
    config = json.loads((minilm_dir / "config.json").read_text())
    prefixed = [("bert." + n, t) for n, t in _iter_safetensors(minilm_dir)]
    model = BertModel(config)
    model.load_weights(iter(prefixed))  # the "bert." prefix and pooler.* are both fine
    reference = dict(_iter_safetensors(minilm_dir))
    value_rows = reference["encoder.layer.0.attention.self.value.weight"]
    assert torch.equal(model.layers[0].qkv.weight[768:], value_rows)

    unexpected = r"unexpected weights: encoder\.layer\.9\.output\.dense\.bias"
    with pytest.raises(ValueError, match=unexpected):
        BertModel(config).load_weights(
            prefixed + [("encoder.layer.9.output.dense.bias", torch.zeros(384))]
        )


def test_load_weights_rejects_wrong_shape(minilm_dir):
    model = BertModel(json.loads((minilm_dir / "config.json").read_text()))
    bad = ("embeddings.LayerNorm.weight", torch.ones(128))
    with pytest.raises(ValueError, match="embeddings.LayerNorm.weight"):
        model.load_weights(iter([bad]))


def test_forward_rejects_inconsistent_lengths(heron_model):
    ids = torch.tensor([101, 7592, 102])
    with pytest.raises(ValueError, match="seq_lens"):
        heron_model(ids, torch.arange(3), [2])
    long = torch.full((600,), 1000)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        heron_model(long, torch.arange(600), [600])


def test_pooling_config_reads_bundled_dir(minilm_dir):
    config = PoolingConfig.from_sentence_transformers_dir(minilm_dir)
    assert config == PoolingConfig(mode="mean", normalize=True, max_seq_length=256, dimension=384)


def test_pooling_config_defaults_without_sentence_transformers_files(minilm_dir, tmp_path):
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    config = PoolingConfig.from_sentence_transformers_dir(tmp_path)
    assert config == PoolingConfig(mode="mean", normalize=False, max_seq_length=None, dimension=384)


def test_pooling_config_reads_cls_mode_and_rejects_dense(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 768, "pooling_mode_cls_token": True})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolingConfig.from_sentence_transformers_dir(tmp_path) == PoolingConfig(
        mode="cls", normalize=False, max_seq_length=None, dimension=768
    )

    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    modules.append(dense)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedPoolingConfig, match="Dense"):
        PoolingConfig.from_sentence_transformers_dir(tmp_path)


@pytest.mark.parametrize("mode", ["mean", "cls", "last", "max"])
def test_pooler_modes_match_per_sequence_reference(mode):
    torch.manual_seed(0)
    seq_lens = [3, 1, 7, 4]
    hidden = torch.randn(sum(seq_lens), 16, dtype=torch.bfloat16)
    pooled = Pooler(PoolingConfig(mode=mode, normalize=False, max_seq_length=None, dimension=16))(
        hidden, seq_lens
    )
    expected = []
    for seq in hidden.float().split(seq_lens):
        expected.append(
            {"mean": seq.mean(0), "cls": seq[0], "last": seq[-1], "max": seq.max(0).values}[mode]
        )
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, torch.stack(expected), atol=1e-6)
