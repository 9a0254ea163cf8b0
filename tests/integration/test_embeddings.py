"""The encoder path on the bundled all-MiniLM-L6-v2: parity with sentence-transformers' `encode`,
batch independence, truncation, input errors, Matryoshka `dimensions`, and the async engine's
micro-batching (merged batches, the event loop kept free, cancellation, shutdown, a dying worker).

sentence-transformers is a test-only reference; it loads the model from the bundled package
directory with the hub switched off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

import numpy as np
import pytest

from heron.engine.async_engine import EngineDeadError
from heron.engine.embedding import AsyncEmbeddingEngine, EmbeddingEngine, EmbeddingInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sentence_transformers = pytest.importorskip("sentence_transformers")

TIMEOUT_S = 60  # a hang fails the test instead of stalling the suite
MAX_LEN = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (its position table has 512)

LONG_EN = "Retrieval systems embed every passage of a document store once and search them later. " * 30
CORPUS = [
    "Hi!",
    "Embeddings power semantic search.",
    LONG_EN,  # ~450 tokens: both sides cut it to 256
    "Le modèle produit des plongements de phrases à partir de textes français.",
    "深度学习模型可以把句子转换成向量。",
    "Привет, как дела? Это тестовое предложение для проверки.",
    "مرحبا بالعالم، هذا اختبار للتضمينات.",
    "東京は日本の首都です。🗼",
    "🙂🚀🔥 emoji only 👍🏽",
    "",  # [CLS] [SEP] only
    "   \n\t ",
    "?!",
    "Ünïcödé wörds, accents and CAPITALS: Ärger über Öl.",
    "a " * 120,  # many short words, under the limit
]


@pytest.fixture(scope="module")
def engine(minilm_dir) -> EmbeddingEngine:
    return EmbeddingEngine.load(minilm_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    return sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")


def vectors(outputs) -> np.ndarray:
    return np.array([o.embedding for o in outputs], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def corpus_ids(engine) -> list[list[int]]:
    # sentence-transformers keeps the start of an over-long text; ask for the same cut explicitly.
    return engine.tokenize(CORPUS, truncate_prompt_tokens=-1, truncation_side="right")


@pytest.fixture(scope="module")
def corpus_vectors(engine, corpus_ids) -> np.ndarray:
    return vectors(engine.embed(corpus_ids))


# ------------------------------------------------------------------------------------------------
# Parity and batching


def test_engine_reads_the_model_pipeline(engine):
    assert engine.max_model_len == MAX_LEN
    assert engine.hidden_size == 384
    assert engine.pooling.mode == "mean" and engine.pooling.normalize
    assert not engine.is_matryoshka


def test_tokenization_matches_sentence_transformers(st_model, corpus_ids):
    # `preprocess` replaced `tokenize` in sentence-transformers 6.
    features = getattr(st_model, "preprocess", st_model.tokenize)(CORPUS)
    for row, ids in enumerate(corpus_ids):
        expected = features["input_ids"][row][features["attention_mask"][row].bool()].tolist()
        assert ids == expected, CORPUS[row][:40]
    assert len(corpus_ids[CORPUS.index(LONG_EN)]) == MAX_LEN
    assert corpus_ids[CORPUS.index("")] == [101, 102]


def test_embeddings_match_sentence_transformers(st_model, corpus_vectors):
    reference = st_model.encode(CORPUS, convert_to_numpy=True, show_progress_bar=False)
    assert corpus_vectors.dtype == np.float32 and corpus_vectors.shape == reference.shape
    cos = cosines(corpus_vectors, reference)
    assert cos.min() >= 0.99999, dict(zip(CORPUS, cos.round(7)))
    np.testing.assert_allclose(np.linalg.norm(corpus_vectors, axis=1), 1.0, atol=1e-5)


def test_batch_equals_one_by_one(engine, corpus_ids, corpus_vectors):
    one_by_one = np.concatenate([vectors(engine.embed([ids])) for ids in corpus_ids])
    assert np.abs(one_by_one - corpus_vectors).max() <= 1e-5


def test_batches_split_by_token_budget_give_the_same_vectors(minilm_dir, engine, corpus_ids, corpus_vectors):
    lens = [len(ids) for ids in corpus_ids]
    batches = engine.plan_batches(lens, budget=300)
    assert len(batches) > 2 and sorted(i for b in batches for i in b) == list(range(len(lens)))
    assert all(sum(lens[i] for i in b) <= 300 for b in batches)
    small = EmbeddingEngine(engine.loaded, max_batch_tokens=300)
    outputs = small.embed(corpus_ids, request_id="req-1")
    assert np.abs(vectors(outputs) - corpus_vectors).max() <= 1e-5
    assert [o.num_prompt_tokens for o in outputs] == lens
    assert {o.request_id for o in outputs} == {"req-1"}


# ------------------------------------------------------------------------------------------------
# Truncation


def test_over_long_input_without_truncation_is_rejected(engine):
    too_long = engine.tokenize([LONG_EN])[0]
    assert len(too_long) > MAX_LEN
    message = rf"maximum input length is {MAX_LEN} tokens, but input 1 has {len(too_long)} tokens"
    with pytest.raises(EmbeddingInputError, match=message) as error:
        engine.embed([[101, 102], too_long])
    assert error.value.param == "input"


def test_truncate_prompt_tokens_keeps_the_last_k_token_ids(engine):
    ids = engine.tokenize([LONG_EN])[0]
    cut = engine.embed([ids], truncate_prompt_tokens=10)
    assert cut[0].num_prompt_tokens == 10
    expected = engine.embed([ids[-10:]])
    assert np.abs(vectors(cut) - vectors(expected)).max() <= 1e-6
    full = engine.embed([ids], truncate_prompt_tokens=-1)
    assert full[0].num_prompt_tokens == MAX_LEN
    # Shorter inputs are left alone.
    assert engine.embed([[101, 7592, 102]], truncate_prompt_tokens=5)[0].num_prompt_tokens == 3


def test_tokenize_truncation_keeps_special_tokens(engine):
    full = engine.tokenize([LONG_EN])[0]
    left = engine.tokenize([LONG_EN], truncate_prompt_tokens=12)[0]
    right = engine.tokenize([LONG_EN], truncate_prompt_tokens=12, truncation_side="right")[0]
    assert left == [101] + full[-11:-1] + [102]  # vLLM: the end of the text survives
    assert right == full[:11] + [102]  # sentence-transformers: the start survives
    assert len(engine.tokenize([LONG_EN], truncate_prompt_tokens=-1)[0]) == MAX_LEN
    assert engine.tokenize(["short"], truncate_prompt_tokens=12) == engine.tokenize(["short"])


@pytest.mark.parametrize("value", [0, -2, MAX_LEN + 1])
def test_bad_truncate_prompt_tokens_is_rejected(engine, value):
    with pytest.raises(EmbeddingInputError, match="truncate_prompt_tokens") as error:
        engine.embed([[101, 102]], truncate_prompt_tokens=value)
    assert error.value.param == "truncate_prompt_tokens"
    with pytest.raises(EmbeddingInputError, match="truncate_prompt_tokens"):
        engine.tokenize(["x"], truncate_prompt_tokens=value)
    with pytest.raises(EmbeddingInputError, match="leaves no room for text beside the model's 2 special"):
        engine.tokenize(["x"], truncate_prompt_tokens=2)


def test_max_model_len_override(engine):
    longer = EmbeddingEngine(engine.loaded, max_model_len=512)
    ids = engine.tokenize([LONG_EN])[0]
    assert longer.embed([ids])[0].num_prompt_tokens == len(ids)
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        EmbeddingEngine(engine.loaded, max_model_len=513)


# ------------------------------------------------------------------------------------------------
# Errors and dimensions


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "input must not be empty"),
        ([[101, 102], []], "input 1 is empty"),
        ([[101, 30522]], "token id 30522, outside this model's vocabulary of 30522"),
        ([[101, -1]], "token id -1"),
    ],
)
def test_bad_inputs_are_rejected(engine, inputs, message):
    with pytest.raises(EmbeddingInputError, match=message) as error:
        engine.embed(inputs)
    assert error.value.param == "input"


def test_dimensions_without_matryoshka_is_rejected_unless_full_size(engine):
    message = "does not support 'dimensions' other than its full size 384"
    with pytest.raises(EmbeddingInputError, match=message) as error:
        engine.embed([[101, 102]], dimensions=128)
    assert error.value.param == "dimensions"
    assert len(engine.embed([[101, 102]], dimensions=384)[0].embedding) == 384


def test_matryoshka_dimensions_truncate_and_renormalise(engine, corpus_ids, corpus_vectors):
    hf_config = {**engine.loaded.hf_config, "matryoshka_dimensions": [384, 256, 128]}
    matryoshka = EmbeddingEngine(dataclasses.replace(engine.loaded, hf_config=hf_config))
    out = vectors(matryoshka.embed(corpus_ids[:4], dimensions=128))
    assert out.shape == (4, 128)
    prefix = corpus_vectors[:4, :128]
    np.testing.assert_allclose(out, prefix / np.linalg.norm(prefix, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match=r"choose one of \[384, 256, 128\]"):
        matryoshka.embed([[101, 102]], dimensions=100)


# ------------------------------------------------------------------------------------------------
# AsyncEmbeddingEngine


def run_async(coro_fn):
    async def main():
        return await asyncio.wait_for(coro_fn(), TIMEOUT_S)

    result = asyncio.run(main())
    assert not any(t.name == "heron-embedding" and t.is_alive() for t in threading.enumerate())
    return result


def test_async_concurrent_requests_are_merged_and_match(engine, corpus_ids, corpus_vectors):
    long_ids = engine.tokenize([LONG_EN] * 6, truncate_prompt_tokens=-1)
    small = [[ids] for ids in corpus_ids]

    async def main():
        async with AsyncEmbeddingEngine(engine) as aengine:
            ticks = 0
            big_done = asyncio.Event()

            async def heartbeat():
                nonlocal ticks
                while not big_done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.005)

            async def big():
                try:
                    return await aengine.embed(long_ids, request_id="big")
                finally:
                    big_done.set()

            beat = asyncio.create_task(heartbeat())
            big_task = asyncio.create_task(big())
            await asyncio.sleep(0)  # the big request is queued first
            results = await asyncio.gather(
                *(aengine.embed(ids, request_id=f"r{i}") for i, ids in enumerate(small))
            )
            await big_task
            await beat
            return results, ticks, aengine.stats

    results, ticks, stats = run_async(main)
    got = np.concatenate([vectors(r) for r in results])
    assert np.abs(got - corpus_vectors).max() <= 1e-5
    assert [r[0].request_id for r in results] == [f"r{i}" for i in range(len(small))]
    # 1 + 14 requests in at most 3 forwards: the small ones waited together behind the big one.
    assert stats.num_batches <= 3, stats
    assert stats.num_inputs == len(small) + len(long_ids)
    assert ticks >= 3  # the event loop kept running while the encoder worked


def test_async_bad_input_fails_at_once_and_engine_serves_on(engine):
    async def main():
        async with AsyncEmbeddingEngine(engine) as aengine:
            with pytest.raises(ValueError, match="maximum input length"):
                await aengine.embed([[101] * 300])
            with pytest.raises(ValueError, match="dimensions"):
                await aengine.embed([[101, 102]], dimensions=3)
            ids = await aengine.tokenize(["hello world"])
            return await aengine.embed(ids), aengine.stats

    outputs, stats = run_async(main)
    assert outputs[0].num_prompt_tokens == 4
    assert stats.num_batches == 1


def test_async_big_request_spans_batches_and_cancel_skips_the_rest(engine):
    ids = engine.tokenize([f"passage number {i} " * 20 for i in range(24)])  # ~60 tokens each

    async def main():
        aengine = AsyncEmbeddingEngine(engine, max_batch_tokens=128)  # two inputs per forward
        async with aengine:
            task = asyncio.create_task(aengine.embed(ids))
            while aengine.stats.num_batches == 0:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = await aengine.embed(ids[:3])
            return after_cancel, aengine.stats

    after_cancel, stats = run_async(main)
    assert len(after_cancel) == 3
    # The cancelled request stopped early instead of running all 12 of its forwards.
    assert stats.num_inputs < len(ids) + 3, stats


def test_async_shutdown_fails_queued_requests_and_refuses_new_ones(engine):
    ids = engine.tokenize(["some text to embed " * 10] * 16)

    async def main():
        aengine = AsyncEmbeddingEngine(engine, max_batch_tokens=64)
        aengine.start()
        tasks = [asyncio.create_task(aengine.embed(ids)) for _ in range(3)]
        await asyncio.sleep(0)
        await aengine.shutdown()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(EngineDeadError):
            await aengine.embed([[101, 102]])
        return outcomes

    outcomes = run_async(main)
    assert any(isinstance(o, EngineDeadError) for o in outcomes), outcomes
    assert all(isinstance(o, (EngineDeadError, list)) for o in outcomes)


def test_a_failing_worker_fails_its_requests_and_refuses_new_ones(engine, monkeypatch):
    ids = engine.tokenize(["some text to embed"] * 4)

    async def main():
        aengine = AsyncEmbeddingEngine(engine)

        def take_batch_failing(pending):
            raise RuntimeError("injected worker failure")

        monkeypatch.setattr(aengine, "_take_batch", take_batch_failing)
        async with aengine:
            outcomes = await asyncio.gather(*(aengine.embed(ids) for _ in range(3)), return_exceptions=True)
            # Dead for good: a new request fails at once, and the server's health check sees it.
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(aengine.embed(ids), 1.0)
            return outcomes, aengine.is_running, aengine.dead_error

    outcomes, running, dead_error = run_async(main)
    for outcome in outcomes:
        assert isinstance(outcome, EngineDeadError), outcome
        assert isinstance(outcome.__cause__, RuntimeError) and "injected" in str(outcome.__cause__)
    assert not running and isinstance(dead_error, RuntimeError)


def test_async_requires_start(engine):
    async def main():
        with pytest.raises(RuntimeError, match="start"):
            await AsyncEmbeddingEngine(engine).embed([[101, 102]])

    run_async(main)
