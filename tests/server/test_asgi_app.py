"""The importable ASGI app (`heron.server.app:app`) under a plain `uvicorn` command, as users run it
in their own deployments: the model and options come from HERON_* environment variables."""

from __future__ import annotations

import pytest
from server_helpers import make_client, start_server, stop_server

from heron.models.bundled import default_chat_model_path, default_embedding_model_path

pytestmark = pytest.mark.timeout(180)


def test_uvicorn_runs_the_app_from_environment(tmp_path, response_checker):
    server = start_server(
        "asgi",
        tmp_path,
        [],
        env={
            "HERON_MODEL": str(default_chat_model_path()),
            "HERON_SERVED_MODEL_NAME": "my-smol,smol",
            "HERON_MAX_MODEL_LEN": "512",
            # A second model beside the main one, with its own served name.
            "HERON_MODELS": f"{default_embedding_model_path()}=embedder",
        },
        uvicorn_app="heron.server.app:app",
        model="my-smol",
        max_model_len=512,
    )
    try:
        with make_client(server.base_url, response_checker) as http:
            # A model named explicitly replaces the bundled pair; HERON_MODELS adds the encoder.
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["my-smol", "smol", "embedder"]
            vectors = http.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "b"]})
            assert vectors.status_code == 200 and len(vectors.json()["data"][1]["embedding"]) == 384
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": "smol",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 12,
                    "temperature": 0,
                },
            )
            assert reply.status_code == 200, reply.text
            assert "Paris" in reply.json()["choices"][0]["message"]["content"]
            assert reply.json()["model"] == "smol"
            too_long = http.post("/v1/completions", json={"model": "smol", "prompt": "hi", "max_tokens": 600})
            assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        problem = stop_server(server)
    assert problem is None, f"{problem}\n{server.log_tail()}"
