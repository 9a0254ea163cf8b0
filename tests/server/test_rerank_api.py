"""POST /v1/rerank (and /rerank, /v2/rerank) and POST /v1/score (and /score), black-box.

One server of its own, with API keys: the bundled chat and embedding models plus a tiny
random-weight BERT cross-encoder (`--model DIR=tiny-reranker`) that transformers builds here.
Scores are compared with references computed in this process: sentence-transformers' cosine
similarity for the embedding model, transformers' logits (and their sigmoid, vLLM's default for
a one-label cross-encoder) for the reranker.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from server_helpers import DEFAULT_MODEL, Server, assert_error, make_client, start_server, stop_server

# The tiny cross-encoder is built as the integration tests build it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from cross_encoder import MAX_POSITIONS, build_cross_encoder  # noqa: E402

pytestmark = pytest.mark.timeout(180)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
RERANKER = "tiny-reranker"
KEY = "rerank-key"
RERANKER_MAX_LEN = MAX_POSITIONS

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "France is a country in Western Europe; its capital is Paris.",
    "Bananas are rich in potassium.",
]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory, minilm_dir) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("tiny-reranker"), minilm_dir, seed=7)


@pytest.fixture(scope="module")
def rerank_server(tmp_path_factory, reranker_dir) -> Iterator[Server]:
    srv = start_server(
        "rerank",
        tmp_path_factory.mktemp("heron-rerank"),
        ["--max-model-len", "512", "--model", f"{reranker_dir}={RERANKER}"],
        env={"HERON_API_KEY": KEY},
        api_key=KEY,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def client(rerank_server, response_checker) -> Iterator[httpx.Client]:
    with make_client(rerank_server.base_url, response_checker, api_key=KEY) as http:
        yield http


@pytest.fixture(scope="module")
def anonymous(rerank_server, response_checker) -> Iterator[httpx.Client]:
    with make_client(rerank_server.base_url, response_checker) as http:
        yield http


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    return sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")


def cosine_reference(st_model, queries: list[str], documents: list[str]) -> np.ndarray:
    """sentence-transformers' cos_sim: one query against all documents, or pairwise N:N."""
    from sentence_transformers import util

    a = st_model.encode(queries, convert_to_tensor=True)
    b = st_model.encode(documents, convert_to_tensor=True)
    return (util.cos_sim(a, b)[0] if len(queries) == 1 else util.pairwise_cos_sim(a, b)).numpy()


@pytest.fixture(scope="module")
def hf_reranker(reranker_dir):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(reranker_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(reranker_dir)

    def logits(queries: list[str], documents: list[str]) -> np.ndarray:
        batch = tokenizer(queries, documents, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).logits[:, 0].numpy()

    return logits


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def rerank(client: httpx.Client, path: str = "/v1/rerank", **body) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def score(client: httpx.Client, path: str = "/v1/score", **body) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def by_index(results: list[dict]) -> np.ndarray:
    out = np.full(len(results), np.nan)
    for result in results:
        out[result["index"]] = result["relevance_score"]
    return out


# ------------------------------------------------------------------------------------------------
# /v1/rerank


def test_rerank_on_the_embedding_model_orders_by_cosine(client, st_model):
    body = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS)
    assert set(body) == {"id", "model", "usage", "results"}
    assert body["id"].startswith("rerank-") and body["model"] == EMBEDDING_MODEL
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert {results[0]["index"], results[1]["index"]} == {1, 3}  # the two Paris documents first
    for result in results:
        assert set(result) == {"index", "document", "relevance_score"}
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    np.testing.assert_allclose(by_index(results), cosine_reference(st_model, [QUERY], DOCUMENTS), atol=1e-5, rtol=0)
    # The query is embedded once beside the documents: its tokens count once.
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(DOCUMENTS) * 3


def test_rerank_top_n_and_return_documents(client):
    everything = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS)["results"]
    top = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS, top_n=2)["results"]
    assert top == everything[:2]
    for top_n in (0, len(DOCUMENTS), 50):  # 0 means all, as in vLLM; more than there are is all
        assert rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS, top_n=top_n)["results"] == everything
    bare = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=False)
    assert [set(r) for r in bare["results"]] == [{"index", "relevance_score"}] * 3
    assert [r["index"] for r in bare["results"]] == [r["index"] for r in everything[:3]]


def test_rerank_documents_as_objects_and_the_aliases(client):
    plain = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS)["results"]
    objects = rerank(client, model=EMBEDDING_MODEL, query=QUERY, documents=[{"text": d} for d in DOCUMENTS])["results"]
    assert objects == plain
    for path in ("/rerank", "/v2/rerank"):
        assert rerank(client, path, model=EMBEDDING_MODEL, query=QUERY, documents=DOCUMENTS)["results"] == plain


def test_rerank_on_the_cross_encoder_matches_transformers(client, hf_reranker):
    logits = hf_reranker([QUERY] * len(DOCUMENTS), DOCUMENTS)
    assert np.ptp(logits) > 1e-2  # the documents really score differently
    body = rerank(client, model=RERANKER, query=QUERY, documents=DOCUMENTS)
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-logits, kind="stable"))
    np.testing.assert_allclose(by_index(body["results"]), sigmoid(logits), atol=1e-5, rtol=0)
    raw = rerank(client, model=RERANKER, query=QUERY, documents=DOCUMENTS, use_activation=False)
    np.testing.assert_allclose(by_index(raw["results"]), logits, atol=1e-4, rtol=0)
    # Every pair is one sequence: [CLS] query [SEP] document [SEP].
    assert body["usage"]["prompt_tokens"] > len(DOCUMENTS) * 10


def test_over_long_pairs_are_refused_unless_truncated(client):
    long_document = "word " * 300
    response = client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": ["ok", long_document]})
    error = assert_error(response, 400, param="documents")
    assert "maximum input length is 128 tokens" in error["message"]
    assert "documents[1]" in error["message"]
    truncated = rerank(client, model=RERANKER, query=QUERY, documents=["ok", long_document], truncate_prompt_tokens=-1)
    assert len(truncated["results"]) == 2
    assert truncated["usage"]["prompt_tokens"] <= 2 * RERANKER_MAX_LEN
    assert_error(
        client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": ["ok"], "truncate_prompt_tokens": 129}),
        400,
        param="truncate_prompt_tokens",
    )


# ------------------------------------------------------------------------------------------------
# /v1/score


def test_score_one_to_one(client, st_model, hf_reranker):
    body = score(client, model=EMBEDDING_MODEL, text_1=QUERY, text_2=DOCUMENTS[1])
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("score-") and body["object"] == "list" and isinstance(body["created"], int)
    assert body["data"][0]["object"] == "score" and body["data"][0]["index"] == 0 and len(body["data"]) == 1
    assert math.isclose(body["data"][0]["score"], float(cosine_reference(st_model, [QUERY], [DOCUMENTS[1]])[0]), abs_tol=1e-5)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0 and usage["completion_tokens"] == 0
    crossed = score(client, model=RERANKER, text_1=QUERY, text_2=DOCUMENTS[1])
    assert math.isclose(crossed["data"][0]["score"], float(sigmoid(hf_reranker([QUERY], [DOCUMENTS[1]]))[0]), abs_tol=1e-5)


def test_score_one_to_n(client, st_model, hf_reranker):
    body = score(client, model=EMBEDDING_MODEL, text_1=[QUERY], text_2=DOCUMENTS)
    assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))  # pair order, not sorted
    got = np.array([d["score"] for d in body["data"]])
    np.testing.assert_allclose(got, cosine_reference(st_model, [QUERY], DOCUMENTS), atol=1e-5, rtol=0)
    crossed = score(client, "/score", model=RERANKER, text_1=QUERY, text_2=DOCUMENTS)
    np.testing.assert_allclose(
        [d["score"] for d in crossed["data"]], sigmoid(hf_reranker([QUERY] * len(DOCUMENTS), DOCUMENTS)), atol=1e-5, rtol=0
    )


def test_score_n_to_n(client, st_model, hf_reranker):
    queries = [QUERY, "Which city is Germany's capital?", "fruit", "Where is Paris?", "animals"]
    body = score(client, model=EMBEDDING_MODEL, text_1=queries, text_2=DOCUMENTS)
    np.testing.assert_allclose(
        [d["score"] for d in body["data"]], cosine_reference(st_model, queries, DOCUMENTS), atol=1e-5, rtol=0
    )
    crossed = score(client, model=RERANKER, text_1=queries, text_2=DOCUMENTS, use_activation=False)
    np.testing.assert_allclose([d["score"] for d in crossed["data"]], hf_reranker(queries, DOCUMENTS), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": "", "documents": ["x"]}, "query"),
        ({"query": QUERY, "documents": ["x"], "top_n": -1}, "top_n"),
        ({"query": QUERY, "documents": [5]}, "documents[0]"),
        ({"query": QUERY, "documents": [{"txt": "x"}]}, "documents[0].text"),
        ({"documents": ["x"]}, "query"),
        ({"query": QUERY}, "documents"),
        ({"query": QUERY, "documents": ["x"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ],
)
def test_invalid_rerank_requests(client, body, param):
    for model in (EMBEDDING_MODEL, RERANKER):
        assert_error(client.post("/v1/rerank", json={"model": model, **body}), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, "text_2"),
        ({"text_1": ["a", "b"], "text_2": "x"}, "text_2"),  # N:1 is no pairing vLLM makes either
        ({"text_1": [], "text_2": ["x"]}, "text_1"),
        ({"text_1": "a", "text_2": []}, "text_2"),
        ({"text_1": "", "text_2": "x"}, "text_1"),
        ({"text_1": ["a", ""], "text_2": ["x", "y"]}, "text_1[1]"),
        ({"text_1": "a", "text_2": 5}, "text_2"),
        ({"text_2": "x"}, "text_1"),
    ],
)
def test_invalid_score_requests(client, body, param):
    for model in (EMBEDDING_MODEL, RERANKER):
        assert_error(client.post("/v1/score", json={"model": model, **body}), 400, param=param)


def test_a_chat_model_is_the_wrong_type(client):
    for path, body in (
        ("/v1/rerank", {"query": QUERY, "documents": ["x"]}),
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
    ):
        error = assert_error(client.post(path, json={"model": DEFAULT_MODEL, **body}), 400, param="model", code="wrong_model_type")
        assert "generates text" in error["message"]
        assert_error(client.post(path, json={"model": "no-such-model", **body}), 404, param="model", code="model_not_found")
    # And the other way round: a reranker neither embeds nor chats.
    for path, body in (
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        error = assert_error(client.post(path, json={"model": RERANKER, **body}), 400, param="model", code="wrong_model_type")
        assert "cross-encoder" in error["message"], error


def test_every_path_needs_the_api_key(anonymous):
    rerank_body = {"model": RERANKER, "query": QUERY, "documents": ["x"]}
    score_body = {"model": RERANKER, "text_1": "a", "text_2": "b"}
    for path, body in (
        ("/v1/rerank", rerank_body), ("/rerank", rerank_body), ("/v2/rerank", rerank_body),
        ("/v1/score", score_body), ("/score", score_body),
    ):
        assert_error(anonymous.post(path, json=body), 401, code="missing_api_key")


def test_the_reranker_is_listed(client):
    names = {model["id"] for model in client.get("/v1/models").json()["data"]}
    assert {DEFAULT_MODEL, EMBEDDING_MODEL, RERANKER} <= names
    index = client.get("/", headers={"Accept": "application/json"}).json()
    assert {"POST /v1/rerank", "POST /v1/score"} <= set(index["endpoints"])
