"""Sampling defaults from the model (--generation-config) and CORS on by default, black-box.

A request that omits a sampling field gets the model's recommended value; for the bundled model,
Heron's shipped values (temperature 0.2, top_p 0.9). The tests prove which values were applied by
comparing seeded outputs with requests that spell the values out, on the session servers and on
servers of their own started with `--generation-config openai` and with a generation_config.json.
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import CHAT_PATH, DEFAULT_MODEL, start_server, stop_server

QUESTION = [{"role": "user", "content": "Write one sentence about herons."}]


def _chat(base_url: str, **fields) -> str:
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 24, "seed": 11, **fields}
    response = httpx.post(f"{base_url}{CHAT_PATH}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _card(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/v1/models/{DEFAULT_MODEL}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_bundled_model_defaults_to_its_model_card_values(server):
    card = _card(server.base_url)
    assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    assert "bundled SmolLM2-135M-Instruct" in card["sampling_defaults_source"]
    assert "sampling defaults temperature=0.2 top_p=0.9" in server.log_text()
    # Omitting the fields is the same as sending those values...
    assert _chat(server.base_url) == _chat(server.base_url, temperature=0.2, top_p=0.9)
    # ...and an explicit field wins over the default.
    assert _chat(server.base_url, temperature=0) == _chat(server.base_url, temperature=0, top_p=0.9)
    # The embedding model has no sampling defaults to show.
    embedder = httpx.get(f"{server.base_url}/v1/models/all-MiniLM-L6-v2", timeout=10).json()
    assert "sampling_defaults" not in embedder


def test_the_default_request_answers_coherently(server):
    # The README's first request, with no sampling fields: at OpenAI's temperature 1.0 the 135M
    # model wrote nonsense about the capital of France.
    answers = []
    for seed in (1, 2, 3):
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], "seed": seed}
        response = httpx.post(f"{server.base_url}{CHAT_PATH}", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    assert all("Paris" in answer for answer in answers), answers


@pytest.fixture(scope="module")
def openai_defaults(tmp_path_factory):
    srv = start_server("openai-defaults", tmp_path_factory.mktemp("gen-openai"), ["--max-model-len", "512", "--generation-config", "openai"], env={})
    yield srv
    assert stop_server(srv) is None


def test_generation_config_openai_uses_openais_defaults(openai_defaults, server):
    card = _card(openai_defaults.base_url)
    assert card["sampling_defaults"] == {} and "openai" in card["sampling_defaults_source"]
    # The same seeded request on the default server, with OpenAI's values spelled out.
    assert _chat(openai_defaults.base_url) == _chat(server.base_url, temperature=1.0, top_p=1.0)


def test_generation_config_path_reads_that_file(tmp_path, server):
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"do_sample": False, "eos_token_id": 2}))
    srv = start_server("path-defaults", tmp_path, ["--max-model-len", "512", "--generation-config", str(config)], env={})
    try:
        card = _card(srv.base_url)
        assert card["sampling_defaults"] == {"temperature": 0.0}
        assert card["sampling_defaults_source"] == f"--generation-config {config}"
        assert _chat(srv.base_url, seed=5) == _chat(server.base_url, temperature=0, seed=99)  # greedy: seed-free
    finally:
        assert stop_server(srv) is None


# ---------------------------------------------------------------------------------------------
# CORS: every origin by default (the strict server is started without --allowed-origins)
# ---------------------------------------------------------------------------------------------

API_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_123"),
    ("DELETE", "/v1/responses/resp_123"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_preflight_is_answered_for_any_origin_by_default(strict_server, method, path):
    origin = "http://some-browser-app.example:5173"
    response = httpx.options(
        f"{strict_server.base_url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "*"
    assert method in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    # A wildcard origin never comes with credentials.
    assert "access-control-allow-credentials" not in response.headers


def test_a_cross_origin_request_gets_the_cors_headers_by_default(strict_server):
    response = httpx.get(
        f"{strict_server.base_url}/v1/models",
        headers={"Origin": "http://elsewhere.example", "Authorization": f"Bearer {strict_server.api_key}"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
