"""A request's text does not depend on what else the server is running (a real `heron serve`).

The same temperature-0 request, and the same seeded one, are sent alone and then while other
streams decode beside them; on the server's default path (Heron's CPU kernels, whichever build this
CPU runs) every answer must be the same text, token for token. This is the user-visible half of the
engine's batched = alone tests: it also covers the HTTP layer's chat templating, the detokenizer and
the prefix cache, which the second and later copies of a request hit.
"""

from __future__ import annotations

import threading

import httpx
from server_helpers import Server, stream_post

# The prompt a user found changing under load on the AVX-512 machines (multi-byte text, emoji).
PROMPT = "Répète exactement: 你好世界 🙂🚀 café naïve"
BYSTANDER_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "List ten uses for a paperclip.",
    "Explain how a bicycle gear works.",
]


def _chat(http: httpx.Client, server: Server, **sampling) -> str:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, **sampling}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _under_load(http: httpx.Client, server: Server, sampling: dict, copies: int = 3) -> list[str]:
    """`copies` sends of the request, each while three long streams decode beside it."""
    answers: list[str] = []
    for _ in range(copies):
        started = threading.Barrier(len(BYSTANDER_PROMPTS) + 1)
        errors: list[str] = []

        def bystander(prompt: str) -> None:
            body = {
                "model": server.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "ignore_eos": True,
                "temperature": 0.9,
                "stream": True,
            }
            started.wait(timeout=30)
            response, stream = stream_post(http, "/v1/chat/completions", body)
            if response.status_code != 200 or not stream.done:
                errors.append(f"bystander got {response.status_code}")

        threads = [threading.Thread(target=bystander, args=(p,)) for p in BYSTANDER_PROMPTS]
        for thread in threads:
            thread.start()
        started.wait(timeout=30)
        answers.append(_chat(http, server, **sampling))
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
    return answers


def test_greedy_text_is_the_same_alone_and_beside_other_streams(server: Server, http: httpx.Client):
    alone = _chat(http, server, temperature=0)
    assert alone
    assert _under_load(http, server, {"temperature": 0}) == [alone] * 3


def test_seeded_text_is_the_same_alone_and_beside_other_streams(server: Server, http: httpx.Client):
    sampling = {"temperature": 1.0, "top_p": 0.95, "seed": 4242}
    alone = _chat(http, server, **sampling)
    assert _chat(http, server, **sampling) == alone  # a replay alone, first
    assert _under_load(http, server, sampling) == [alone] * 3
