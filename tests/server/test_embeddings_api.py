"""POST /v1/embeddings on the default server, which serves the bundled MiniLM beside the chat model.

Driven with the official SDK (its default request is base64, which it decodes itself) and raw HTTP;
bodies are checked against OpenAI's CreateEmbeddingResponse by the client transport. Vectors are
compared with Heron's own EmbeddingEngine in this process, whose parity with sentence-transformers
tests/integration/test_embeddings.py establishes.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from server_helpers import DEFAULT_MODEL, assert_error

pytestmark = pytest.mark.timeout(120)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "東京は日本の首都です。",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "emoji 🎉 and whitespace   runs",
]


@pytest.fixture(scope="module")
def reference():
    from heron.engine.embedding import EmbeddingEngine

    engine = EmbeddingEngine.load()
    return np.array([o.embedding for o in engine.embed(engine.tokenize(CORPUS))], dtype=np.float32)


def test_models_lists_both_kinds(oai):
    names = {model.id for model in oai.models.list().data}
    assert {DEFAULT_MODEL, EMBEDDING_MODEL} <= names


def test_float_and_sdk_base64_agree_with_the_engine(oai, reference):
    floats = oai.embeddings.create(model=EMBEDDING_MODEL, input=CORPUS, encoding_format="float")
    decoded = oai.embeddings.create(model=EMBEDDING_MODEL, input=CORPUS)  # SDK asks base64, decodes
    assert [d.index for d in floats.data] == list(range(len(CORPUS)))
    got_float = np.array([d.embedding for d in floats.data], dtype=np.float32)
    got_b64 = np.array([d.embedding for d in decoded.data], dtype=np.float32)
    assert got_float.shape == (len(CORPUS), 384)
    np.testing.assert_array_equal(got_float, got_b64)
    cosine = (got_float * reference).sum(-1) / np.linalg.norm(got_float, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(np.linalg.norm(got_float, axis=-1), 1.0, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(CORPUS)


def test_raw_base64_is_little_endian_float32(http, reference):
    response = http.post(
        "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": CORPUS[1], "encoding_format": "base64"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == EMBEDDING_MODEL
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, reference[1], atol=1e-6)


def test_token_id_inputs_match_text_inputs(http):
    from heron.engine.embedding import EmbeddingEngine

    ids = EmbeddingEngine.load().tokenize(CORPUS[:2])
    by_text = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": CORPUS[:2]}).json()
    by_ids = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ids}).json()
    one = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ids[0]}).json()
    for i in range(2):
        np.testing.assert_allclose(by_text["data"][i]["embedding"], by_ids["data"][i]["embedding"], atol=1e-6)
    np.testing.assert_allclose(one["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    assert by_ids["usage"]["prompt_tokens"] == sum(len(x) for x in ids)


def test_over_long_input_needs_truncation(http):
    long_text = "word " * 400
    assert_error(
        http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": long_text}), 400, param="input"
    )
    ok = http.post(
        "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": long_text, "truncate_prompt_tokens": -1}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 64}, "dimensions"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": [[1, 2], []]}, "input[1]"),
        ({"input": [10**9]}, "input"),
        ({"input": 5}, "input"),
        ({}, "input"),
    ],
)
def test_invalid_embedding_requests(http, body, param):
    assert_error(http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, **body}), 400, param=param)


def test_requests_route_by_model_kind(oai):
    with pytest.raises(openai.BadRequestError) as chat_to_encoder:
        oai.chat.completions.create(model=EMBEDDING_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat_to_encoder.value.body["param"] == "model" and chat_to_encoder.value.body["code"] == "wrong_model_type"
    with pytest.raises(openai.BadRequestError) as embed_to_decoder:
        oai.embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert embed_to_decoder.value.body["code"] == "wrong_model_type"
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="hi")
