"""Scores on the encoder path: a BERT cross-encoder against transformers, the bundled embedding
model's cosine scores against sentence-transformers.

The cross-encoder is a tiny random-weight BertForSequenceClassification (one label) that
transformers builds and saves here beside the bundled MiniLM tokenizer files; Heron loads it with
its own model code. Its logits must equal transformers' on the same pairs batched together (pairs
of different lengths in one padded batch there, one packed batch here), its pair encoding must be
the Hugging Face tokenizer's (token ids and token types, truncation too), and its default scores
must be sentence-transformers' CrossEncoder scores (sigmoid of the logit, vLLM's default for one
label). transformers and sentence-transformers are test-only references; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cross_encoder import MAX_POSITIONS, build_cross_encoder

from heron.engine.embedding import AsyncEmbeddingEngine, EmbeddingEngine, EmbeddingInputError
from heron.models.loader import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

TIMEOUT_S = 60

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog, again and again, while the farmer watches from "
    "the porch of his old wooden house at the edge of the field.",
    "France",
    "",
    "Ünïcödé wörds, 東京 and emoji 🎉 in one document.",
]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory, minilm_dir) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("tiny-reranker"), minilm_dir)


@pytest.fixture(scope="module")
def engine(reranker_dir) -> EmbeddingEngine:
    return EmbeddingEngine.load(reranker_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_model(reranker_dir):
    return transformers.AutoModelForSequenceClassification.from_pretrained(reranker_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(reranker_dir):
    return transformers.AutoTokenizer.from_pretrained(reranker_dir)


def hf_logits(hf_model, hf_tokenizer, queries: list[str], documents: list[str], **tokenizer_kwargs) -> np.ndarray:
    batch = hf_tokenizer(queries, documents, padding=True, return_tensors="pt", **tokenizer_kwargs)
    with torch.no_grad():
        return hf_model(**batch).logits[:, 0].numpy()


# ------------------------------------------------------------------------------------------------
# Cross-encoder


def test_the_loader_reads_a_cross_encoder(engine, reranker_dir):
    loaded = engine.loaded
    assert loaded.is_embedding and loaded.is_cross_encoder
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert engine.is_cross_encoder and engine.output_size == 1
    assert engine.max_model_len == MAX_POSITIONS
    assert engine.score_activation_name == "Sigmoid"
    assert loaded.dtype == torch.float32 and loaded.chat_template is None


def test_pair_encoding_matches_the_hf_tokenizer(engine, hf_tokenizer):
    inputs = engine.tokenize_score([QUERY], DOCUMENTS)
    assert inputs.num_pairs == len(DOCUMENTS) and len(inputs.token_ids) == len(DOCUMENTS)
    # Batched, as sentence-transformers' CrossEncoder calls it (called with one pair, the HF
    # tokenizer reads an empty text_pair as no pair at all and drops its [SEP]).
    expected = hf_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS)
    for j, document in enumerate(DOCUMENTS):
        assert inputs.token_ids[j] == expected["input_ids"][j], document
        types = [0] * inputs.segment_starts[j] + [1] * (len(inputs.token_ids[j]) - inputs.segment_starts[j])
        assert types == expected["token_type_ids"][j], document
    assert inputs.token_ids[DOCUMENTS.index("")][-2:] == [102, 102]
    # [CLS] query [SEP] document [SEP], the document's part typed 1.
    first = inputs.token_ids[0]
    assert first[0] == 101 and first[inputs.segment_starts[0] - 1] == 102 and first[-1] == 102


def test_logits_match_transformers_on_a_mixed_length_batch(engine, hf_model, hf_tokenizer):
    inputs = engine.tokenize_score([QUERY], DOCUMENTS)
    lengths = {len(ids) for ids in inputs.token_ids}
    assert len(lengths) == len(DOCUMENTS)  # every pair a different length, all in one batch
    ours = np.array(engine.score(inputs, use_activation=False))
    reference = hf_logits(hf_model, hf_tokenizer, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    assert np.abs(reference).max() > 0.05  # not a degenerate model whose logits all vanish
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    # The pairs really differ: a head that ignored its input would give one number.
    assert np.ptp(ours) > 1e-2


def test_n_to_n_pairs_and_one_pair_at_a_time_agree(engine, hf_model, hf_tokenizer):
    queries = [QUERY, "Where is Berlin?", "fox", "q", "empty document", "unicode"]
    inputs = engine.tokenize_score(queries, DOCUMENTS)
    together = np.array(engine.score(inputs, use_activation=False))
    reference = hf_logits(hf_model, hf_tokenizer, queries, DOCUMENTS)
    np.testing.assert_allclose(together, reference, atol=1e-4, rtol=0)
    one_by_one = [engine.score(engine.tokenize_score([q], [d]), use_activation=False)[0] for q, d in zip(queries, DOCUMENTS)]
    np.testing.assert_allclose(together, one_by_one, atol=1e-5, rtol=0)


def test_default_scores_are_sentence_transformers_cross_encoder_scores(engine, reranker_dir):
    cross_encoder = sentence_transformers.CrossEncoder(str(reranker_dir), device="cpu")
    reference = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS], show_progress_bar=False)
    ours = np.array(engine.score(engine.tokenize_score([QUERY], DOCUMENTS)))
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    logits = np.array(engine.score(engine.tokenize_score([QUERY], DOCUMENTS), use_activation=False))
    np.testing.assert_allclose(ours, 1 / (1 + np.exp(-logits)), atol=1e-6, rtol=0)


def test_an_identity_activation_in_the_config_gives_raw_logits(tmp_path, minilm_dir, hf_tokenizer):
    path = build_cross_encoder(tmp_path / "identity", minilm_dir, seed=3)
    config = json.loads((path / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (path / "config.json").write_text(json.dumps(config))
    engine = EmbeddingEngine.load(path, dtype="float32", device="cpu")
    assert engine.score_activation_name == "Identity"
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = engine.score(engine.tokenize_score([QUERY], DOCUMENTS[:3]))
    reference = hf_logits(hf_model, hf_tokenizer, [QUERY] * 3, DOCUMENTS[:3])
    np.testing.assert_allclose(scores, reference, atol=1e-4, rtol=0)
    assert (reference < 0).any() or (reference > 1).any()  # not something a sigmoid could give


@pytest.mark.parametrize("limit", [12, 20, 33])
def test_truncation_cuts_pairs_as_the_hf_tokenizer_does(engine, hf_model, hf_tokenizer, limit):
    long_query = "where does the long query end " * 6
    queries = [long_query, QUERY, long_query]
    documents = [DOCUMENTS[2], DOCUMENTS[2], "short"]
    inputs = engine.tokenize_score(queries, documents, truncate_prompt_tokens=limit)
    expected = hf_tokenizer(queries, documents, truncation=True, max_length=limit)
    assert inputs.token_ids == expected["input_ids"]
    for ids, start, types in zip(inputs.token_ids, inputs.segment_starts, expected["token_type_ids"]):
        assert len(ids) <= limit and [0] * start + [1] * (len(ids) - start) == types
    np.testing.assert_allclose(
        engine.score(inputs, use_activation=False),
        hf_logits(hf_model, hf_tokenizer, queries, documents, truncation=True, max_length=limit),
        atol=1e-4,
        rtol=0,
    )


def test_over_long_pairs_need_truncation(engine):
    long_document = "word " * 200
    with pytest.raises(EmbeddingInputError, match=r"maximum input length is 128 tokens, but the pair of query and documents\[1\] has \d+ tokens") as error:
        engine.tokenize_score([QUERY], ["short", long_document], params=("query", "documents"))
    assert error.value.param == "documents"
    truncated = engine.tokenize_score([QUERY], ["short", long_document], truncate_prompt_tokens=-1)
    assert len(truncated.token_ids[1]) == MAX_POSITIONS
    with pytest.raises(EmbeddingInputError, match="greater than this model's maximum") as error:
        engine.tokenize_score([QUERY], ["short"], truncate_prompt_tokens=MAX_POSITIONS + 1)
    assert error.value.param == "truncate_prompt_tokens"
    with pytest.raises(EmbeddingInputError, match="no room") as error:
        engine.tokenize_score([QUERY], ["short"], truncate_prompt_tokens=4)


def test_pairing_rules(engine):
    with pytest.raises(EmbeddingInputError, match="1:N") as error:
        engine.tokenize_score(["a", "b"], ["x", "y", "z"])
    assert error.value.param == "text_2"
    with pytest.raises(EmbeddingInputError, match="1:N"):
        engine.tokenize_score(["a", "b"], ["x"])  # N:1 is not a pairing vLLM makes either
    with pytest.raises(EmbeddingInputError) as error:
        engine.tokenize_score([], ["x"])
    assert error.value.param == "text_1"


def test_a_cross_encoder_does_not_embed(engine):
    with pytest.raises(EmbeddingInputError, match="cross-encoder"):
        engine.embed([[101, 102]])


def test_a_several_label_classifier_is_refused(tmp_path, minilm_dir):
    path = build_cross_encoder(tmp_path / "three", minilm_dir)
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="3 labels"):
        load_model(path, dtype="float32", device="cpu", progress=False)


def test_async_scores_match_and_share_batches(engine):
    queries = [QUERY, "Where is Berlin?"]

    async def main():
        async with AsyncEmbeddingEngine(engine) as aengine:
            first = await aengine.tokenize_score([QUERY], DOCUMENTS)
            second = await aengine.tokenize_score(queries, DOCUMENTS[:2])
            results = await asyncio.gather(aengine.score(first), aengine.score(second, use_activation=False))
            return results, aengine.stats

    results, stats = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    np.testing.assert_allclose(results[0], engine.score(engine.tokenize_score([QUERY], DOCUMENTS)), atol=1e-6)
    np.testing.assert_allclose(
        results[1], engine.score(engine.tokenize_score(queries, DOCUMENTS[:2]), use_activation=False), atol=1e-5
    )
    assert stats.num_inputs == len(DOCUMENTS) + 2


# ------------------------------------------------------------------------------------------------
# Embedding model: cosine similarity


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> EmbeddingEngine:
    return EmbeddingEngine.load(minilm_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    return sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")


def test_cosine_scores_match_sentence_transformers(minilm, st_model):
    from sentence_transformers import util

    inputs = minilm.tokenize_score([QUERY], DOCUMENTS)
    # The query is embedded once, beside the documents.
    assert inputs.num_queries == 1 and len(inputs.token_ids) == 1 + len(DOCUMENTS)
    ours = np.array(minilm.score(inputs))
    reference = util.cos_sim(
        st_model.encode([QUERY], convert_to_tensor=True), st_model.encode(DOCUMENTS, convert_to_tensor=True)
    )[0].numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    assert int(np.argmax(ours)) == 0 and np.ptp(ours) > 0.3  # Paris first, and far apart


def test_cosine_n_to_n_scores_match_sentence_transformers(minilm, st_model):
    from sentence_transformers import util

    queries = [QUERY, "Which city is Germany's capital?", "a fast fox", "nothing", "empty", "characters"]
    ours = np.array(minilm.score(minilm.tokenize_score(queries, DOCUMENTS)))
    reference = util.pairwise_cos_sim(
        st_model.encode(queries, convert_to_tensor=True), st_model.encode(DOCUMENTS, convert_to_tensor=True)
    ).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


def test_use_activation_does_not_change_cosine_scores(minilm):
    inputs = minilm.tokenize_score([QUERY], DOCUMENTS[:2])
    assert minilm.score(inputs, use_activation=False) == minilm.score(inputs)


def test_over_long_texts_on_an_embedding_model(minilm):
    long_text = "word " * 300
    with pytest.raises(EmbeddingInputError, match=r"text_2\[1\] has 302 tokens") as error:
        minilm.tokenize_score(["q"], ["ok", long_text])
    assert error.value.param == "text_2"
    inputs = minilm.tokenize_score(["q"], ["ok", long_text], truncate_prompt_tokens=-1)
    assert len(inputs.token_ids[2]) == minilm.max_model_len == 256
    # Cut from the right, as the Hugging Face tokenizer vLLM calls for scores does.
    assert inputs.token_ids[2] == minilm.tokenize([long_text], -1, truncation_side="right")[0]
