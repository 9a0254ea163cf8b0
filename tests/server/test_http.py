"""`heron serve` over raw HTTP (httpx): every endpoint, SSE framing, headers, CORS, auth, limits, and a
table of invalid requests that must each get their 4xx with OpenAI's error envelope.

Black-box: the tests know only the HTTP contract. Every response body and stream chunk is also
checked against OpenAI's spec by the clients' transport (see server_helpers.py). Generation is
kept to a few tokens per request (the bundled model decodes ~20 tokens/s per stream on 2 cores).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from server_helpers import (
    ALLOWED_ORIGIN,
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MODEL,
    STRICT_KEYS,
    STRICT_MAX_BODY_BYTES,
    STRICT_MODEL_NAMES,
    assert_error,
    make_client,
    parse_sse,
    stream_post,
    summarize_stream,
)

pytestmark = pytest.mark.timeout(120)

PARIS_QUESTION = "What is the capital of France?"


def chat_body(content: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def completion_body(prompt: Any = "Once upon a time", **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 4, **fields}


def ok_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:1000]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    return response.json()


def wait_for_health(client: httpx.Client, condition: Callable[[dict], bool], timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = ok_json(client.get("/health"))
        if condition(health):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"/health never satisfied the condition within {timeout} s; last: {health}")
        time.sleep(0.05)


def tokenize_count(client: httpx.Client, **body: Any) -> int:
    return ok_json(client.post("/tokenize", json={"model": DEFAULT_MODEL, **body}))["count"]


# =============================================================================================
# Service endpoints
# =============================================================================================


def test_root_names_the_server_its_version_and_endpoints(http):
    root = ok_json(http.get("/"))
    assert "heron" in str(root["name"]).lower()
    version = ok_json(http.get("/version"))["version"]
    assert isinstance(version, str) and version
    assert root["version"] == version
    listed = json.dumps(root["endpoints"])
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"):
        assert path in listed, f"{path} not listed in GET / endpoints: {listed}"


def test_health_reports_status_and_load(http):
    health = ok_json(http.get("/health"))
    assert health["status"] == "ok"
    assert isinstance(health["running"], int) and health["running"] >= 0
    assert isinstance(health["waiting"], int) and health["waiting"] >= 0
    assert isinstance(health["kv_cache_usage"], (int, float)) and 0.0 <= health["kv_cache_usage"] <= 1.0


def test_docs_and_openapi_schema(http):
    docs = http.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    schema = ok_json(http.get("/openapi.json"))
    assert "openapi" in schema
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in schema["paths"], f"{path} missing from /openapi.json"


def test_models_list_and_retrieve(http, server):
    listing = ok_json(http.get("/v1/models"))
    assert listing["object"] == "list"
    ids = [card["id"] for card in listing["data"]]
    # With no model named, `heron serve` serves the bundled chat and embedding models.
    assert ids == [DEFAULT_MODEL, "all-MiniLM-L6-v2"]
    card = listing["data"][0]
    assert card["object"] == "model" and card["owned_by"]
    retrieved = ok_json(http.get(f"/v1/models/{DEFAULT_MODEL}"))
    assert retrieved["id"] == DEFAULT_MODEL and retrieved["object"] == "model"
    assert_error(http.get("/v1/models/no-such-model"), 404, code="model_not_found")


def test_tokenize_detokenize_roundtrip(http, server):
    text = "Hello world, this is Heron."
    plain = ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "prompt": text, "add_special_tokens": False}))
    assert plain["count"] == len(plain["tokens"]) > 3
    assert plain["max_model_len"] == server.max_model_len
    assert all(isinstance(t, int) and t >= 0 for t in plain["tokens"])
    back = ok_json(http.post("/detokenize", json={"model": DEFAULT_MODEL, "tokens": plain["tokens"]}))
    assert back["prompt"] == text
    # `model` is optional for a single-model server, as in vLLM.
    assert ok_json(http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}))["tokens"] == plain["tokens"]


def test_tokenize_messages_applies_the_chat_template(http):
    messages = [{"role": "user", "content": PARIS_QUESTION}]
    chat = ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "messages": messages}))
    plain = ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "prompt": PARIS_QUESTION}))
    assert chat["count"] == len(chat["tokens"]) > plain["count"]
    rendered = ok_json(http.post("/detokenize", json={"model": DEFAULT_MODEL, "tokens": chat["tokens"]}))["prompt"]
    # SmolLM2's ChatML template, ending with the generation prompt.
    assert "<|im_start|>user\n" + PARIS_QUESTION in rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant")


# =============================================================================================
# Chat completions
# =============================================================================================


PARIS_REQUEST = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": PARIS_QUESTION}],
    "max_tokens": 16,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def paris(http) -> httpx.Response:
    """One greedy non-streaming answer, shared by the tests that compare against it."""
    return http.post(CHAT_PATH, json=PARIS_REQUEST)


def test_chat_greedy_answer_mentions_paris(paris, http):
    body = ok_json(paris)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == DEFAULT_MODEL
    assert abs(body["created"] - time.time()) < 600
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["logprobs"] is None
    usage = body["usage"]
    prompt_tokens = tokenize_count(http, messages=PARIS_REQUEST["messages"])
    assert usage["prompt_tokens"] == prompt_tokens
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert paris.headers.get("x-request-id"), "X-Request-Id must be generated when the client sends none"


def test_chat_stream_equals_non_stream_and_frames_correctly(paris, http):
    expected = ok_json(paris)
    body = {**PARIS_REQUEST, "stream": True, "stream_options": {"include_usage": True}}
    response, sse = stream_post(http, CHAT_PATH, body)
    # Framing: one `data: ` line per event, [DONE] last, nothing else.
    assert sse.done
    assert sse.events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") and "\n" not in event for event in sse.events), sse.events
    assert not sse.comments, "keep-alive comments are off by default"
    assert sse.raw.endswith(b"data: [DONE]\n\n")
    for chunk in sse.chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == DEFAULT_MODEL
    choices, usage = summarize_stream(sse.chunks, chat=True, include_usage=True)
    assert list(choices) == [0]
    assert choices[0].text == expected["choices"][0]["message"]["content"]
    assert choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert usage["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == expected["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.headers.get("x-request-id")


def test_sse_headers_disable_caching_and_proxy_buffering(http):
    response, sse = stream_post(http, CHAT_PATH, chat_body(max_tokens=1, stream=True))
    assert sse.done
    assert "no-cache" in response.headers.get("cache-control", ""), response.headers
    assert response.headers.get("x-accel-buffering") == "no", response.headers


def test_chat_stream_n2_interleaves_choices(http):
    body = chat_body(
        "Tell me a story.", n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, stream=True,
        stream_options={"include_usage": True},
    )
    _, sse = stream_post(http, CHAT_PATH, body)
    choices, usage = summarize_stream(sse.chunks, chat=True, include_usage=True)
    assert sorted(choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in choices.values())
    assert usage["completion_tokens"] == 12
    order = [c["index"] for chunk in sse.chunks for c in chunk["choices"]]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 2, f"choices are not interleaved: index order {order}"


def test_chat_n2_non_streaming(http):
    body = ok_json(http.post(CHAT_PATH, json=chat_body("Say something.", n=2, temperature=1.0, seed=3, max_tokens=4)))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] <= 8


def test_chat_logprobs_and_top_logprobs(http):
    body = ok_json(
        http.post(
            CHAT_PATH,
            json=chat_body(PARIS_QUESTION, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3),
        )
    )
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0.0
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert top[0]["token"] == entry["token"]
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)


def test_chat_logprobs_cover_exactly_the_content(http):
    # Finishing on EOS: `logprobs.content` lists the message's content tokens (OpenAI never shows
    # the end-of-turn token there), so the tokens join back to the content.
    body = ok_json(http.post(CHAT_PATH, json={**PARIS_REQUEST, "logprobs": True}))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    assert "".join(tokens) == choice["message"]["content"], tokens


def test_chat_seed_makes_sampling_reproducible(http):
    body = chat_body("Write a word.", temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    first = ok_json(http.post(CHAT_PATH, json=body))["choices"][0]["message"]["content"]
    second = ok_json(http.post(CHAT_PATH, json=body))["choices"][0]["message"]["content"]
    assert first == second


def test_chat_stop_string_cuts_the_text(http):
    base = chat_body("Count from one to ten in words.", temperature=0, max_tokens=12, ignore_eos=True)
    full = ok_json(http.post(CHAT_PATH, json=base))["choices"][0]["message"]["content"]
    # A two-character stop taken from the middle of the greedy answer, not whitespace.
    start = next(i for i in range(len(full) // 2, len(full) - 1) if full[i : i + 2].strip() == full[i : i + 2])
    stop = full[start : start + 2]
    cut = full.index(stop)
    stopped = ok_json(http.post(CHAT_PATH, json={**base, "stop": [stop, "@@never@@"]}))["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == full[:cut]
    kept = ok_json(http.post(CHAT_PATH, json={**base, "stop": stop, "include_stop_str_in_output": True}))["choices"][0]
    assert kept["finish_reason"] == "stop"
    assert kept["message"]["content"] == full[: cut + len(stop)]


def test_max_completion_tokens_wins_over_max_tokens(http):
    body = ok_json(http.post(CHAT_PATH, json=chat_body(max_tokens=5, max_completion_tokens=3, ignore_eos=True)))
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


def test_continue_final_message_prefills_the_answer(http):
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "user", "content": PARIS_QUESTION},
            {"role": "assistant", "content": "The capital of France is"},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "temperature": 0,
        "max_tokens": 6,
    }
    content = ok_json(http.post(CHAT_PATH, json=body))["choices"][0]["message"]["content"]
    assert "Paris" in content
    assert not content.lstrip().startswith("The capital"), "the prefill must be continued, not restarted"


def test_vllm_extras_are_known_fields(http):
    chat = chat_body(
        top_k=40, min_p=0.05, repetition_penalty=1.1, min_tokens=2, ignore_eos=False, stop_token_ids=[2],
        skip_special_tokens=True, include_stop_str_in_output=False, chat_template_kwargs={"x": 1},
        add_generation_prompt=True, temperature=0.7, seed=1, user="tester",
    )
    response = http.post(CHAT_PATH, json=chat)
    assert ok_json(response)["usage"]["completion_tokens"] >= 2  # min_tokens
    assert "x-heron-ignored-fields" not in response.headers, response.headers.get("x-heron-ignored-fields")
    completion = completion_body(
        top_k=40, min_p=0.05, repetition_penalty=1.1, min_tokens=1, stop_token_ids=[2], skip_special_tokens=True,
        include_stop_str_in_output=False, ignore_eos=True, echo=False, seed=1, temperature=0.7,
    )
    response = http.post(COMPLETIONS_PATH, json=completion)
    assert ok_json(response)["usage"]["completion_tokens"] == 4
    assert "x-heron-ignored-fields" not in response.headers, response.headers.get("x-heron-ignored-fields")


def test_prefix_cache_hits_show_as_cached_tokens(http):
    # A prompt no earlier request shares, long enough to fill several KV blocks.
    prompt = f"[{uuid.uuid4().hex}] " + "The quick brown fox jumps over the lazy dog. " * 30
    body = completion_body(prompt, max_tokens=1)
    first = ok_json(http.post(COMPLETIONS_PATH, json=body))["usage"]
    second = ok_json(http.post(COMPLETIONS_PATH, json=body))["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 200
    assert (first.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= second["prompt_tokens"], second


# =============================================================================================
# Text completions
# =============================================================================================

COMPLETION_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def greedy_completion(http) -> dict[str, Any]:
    return ok_json(
        http.post(COMPLETIONS_PATH, json=completion_body(COMPLETION_PROMPT, temperature=0, max_tokens=6, ignore_eos=True))
    )


def test_completion_basic_shape_and_usage(greedy_completion, http):
    body = greedy_completion
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == DEFAULT_MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["text"] and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == tokenize_count(http, prompt=COMPLETION_PROMPT)
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_completion_stream_equals_non_stream(greedy_completion, http):
    body = completion_body(COMPLETION_PROMPT, temperature=0, max_tokens=6, ignore_eos=True, stream=True)
    _, sse = stream_post(http, COMPLETIONS_PATH, body)
    assert sse.done and sse.events[-1] == "data: [DONE]"
    for chunk in sse.chunks:
        assert chunk["object"] == "text_completion"
        assert "usage" not in chunk or chunk["usage"] is None
    choices, _ = summarize_stream(sse.chunks, chat=False, include_usage=False)
    assert choices[0].text == greedy_completion["choices"][0]["text"]
    assert choices[0].finish_reason == "length"


def test_completion_prompt_forms(http, greedy_completion):
    ids = ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "prompt": COMPLETION_PROMPT}))["tokens"]
    # Token ids give exactly what the text gives.
    by_ids = ok_json(
        http.post(COMPLETIONS_PATH, json=completion_body(ids, temperature=0, max_tokens=6, ignore_eos=True))
    )
    assert by_ids["choices"][0]["text"] == greedy_completion["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    # A batch of strings: one choice per prompt, in order.
    batch = ok_json(http.post(COMPLETIONS_PATH, json=completion_body([COMPLETION_PROMPT, "Hello"], temperature=0, max_tokens=2)))
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    # A batch of token-id lists, with n=2: index = prompt_index * n + j, as OpenAI numbers them.
    hello = ok_json(http.post("/tokenize", json={"model": DEFAULT_MODEL, "prompt": "Hello"}))["tokens"]
    multi = ok_json(
        http.post(COMPLETIONS_PATH, json=completion_body([ids, hello], n=2, temperature=1.0, seed=5, max_tokens=2))
    )
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    assert multi["usage"]["prompt_tokens"] == len(ids) + len(hello)


def test_completion_echo_prepends_the_prompt(http):
    body = ok_json(http.post(COMPLETIONS_PATH, json=completion_body(COMPLETION_PROMPT, echo=True, temperature=0, max_tokens=3)))
    text = body["choices"][0]["text"]
    assert text.startswith(COMPLETION_PROMPT) and len(text) > len(COMPLETION_PROMPT)


def test_completion_logprobs(http):
    body = ok_json(
        http.post(
            COMPLETIONS_PATH,
            json=completion_body(COMPLETION_PROMPT, temperature=0, max_tokens=4, ignore_eos=True, logprobs=2),
        )
    )
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert "".join(lp["tokens"]) == choice["text"]
    for i, (token, logprob, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        assert logprob <= 0.0
        assert 2 <= len(top) <= 3  # the top 2, plus the sampled token when it is not among them
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the sampled token is the best
        assert token in top
        if i:
            assert lp["text_offset"][i] == lp["text_offset"][i - 1] + len(lp["tokens"][i - 1])


def test_completion_echo_with_zero_max_tokens_scores_the_prompt(http):
    body = ok_json(
        http.post(COMPLETIONS_PATH, json=completion_body(COMPLETION_PROMPT, echo=True, max_tokens=0, logprobs=1))
    )
    [choice] = body["choices"]
    assert choice["text"] == COMPLETION_PROMPT
    usage = body["usage"]
    assert usage["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] == len(lp["token_logprobs"])
    assert "".join(lp["tokens"]) == COMPLETION_PROMPT
    assert lp["text_offset"][0] == 0
    # The first prompt token has nothing to be predicted from: null, as OpenAI sends it.
    assert lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0.0 for x in lp["token_logprobs"][1:])


def test_completion_best_of_returns_n(http):
    body = ok_json(http.post(COMPLETIONS_PATH, json=completion_body(best_of=2, n=1, temperature=1.0, seed=11, max_tokens=3)))
    assert [c["index"] for c in body["choices"]] == [0]


def test_completion_stream_batch_with_usage(http):
    body = completion_body(
        ["One", "Two"], max_tokens=2, ignore_eos=True, stream=True, stream_options={"include_usage": True}
    )
    _, sse = stream_post(http, COMPLETIONS_PATH, body)
    choices, usage = summarize_stream(sse.chunks, chat=False, include_usage=True)
    assert sorted(choices) == [0, 1]
    assert usage["completion_tokens"] == 4


# =============================================================================================
# Headers: request ids, ignored fields, content types, CORS
# =============================================================================================


def test_request_id_is_echoed_on_success_and_error(http):
    ok = http.post(CHAT_PATH, json=chat_body(max_tokens=1), headers={"X-Request-Id": "test-req-123"})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "test-req-123"
    bad = http.post(CHAT_PATH, json=chat_body(temperature=5), headers={"X-Request-Id": "test-req-456"})
    assert_error(bad, 400)
    assert bad.headers["x-request-id"] == "test-req-456"
    generated = [http.get("/v1/models").headers.get("x-request-id") for _ in range(2)]
    assert all(generated) and generated[0] != generated[1]


def test_unknown_fields_are_ignored_and_named_in_a_header(http):
    body = chat_body(max_tokens=1, foo=1, service_tier="auto")
    body["messages"][0]["bar"] = True
    response = http.post(CHAT_PATH, json=body)
    ok_json(response)
    named = {field.strip() for field in response.headers["x-heron-ignored-fields"].split(",")}
    assert named == {"foo", "service_tier", "messages[0].bar"}
    completion = http.post(COMPLETIONS_PATH, json=completion_body(max_tokens=1, baz=[1]))
    ok_json(completion)
    assert completion.headers["x-heron-ignored-fields"] == "baz"


def test_json_content_type_with_charset_is_accepted(http):
    response = http.post(
        CHAT_PATH, content=json.dumps(chat_body(max_tokens=1)), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    ok_json(response)


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_preflight_from_an_allowed_origin(http):
    response = http.options(CHAT_PATH, headers={"Origin": ALLOWED_ORIGIN, **PREFLIGHT})
    assert response.status_code in (200, 204), response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    methods = response.headers["access-control-allow-methods"]
    assert "POST" in methods or methods == "*"
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert allowed_headers == "*" or ("authorization" in allowed_headers and "content-type" in allowed_headers)
    # The actual request then carries the header too.
    simple = http.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_cors_refuses_other_origins(http):
    evil = "http://evil.example"
    response = http.options(CHAT_PATH, headers={"Origin": evil, **PREFLIGHT})
    assert response.status_code < 500
    assert "access-control-allow-origin" not in response.headers, response.headers
    if response.status_code >= 400:
        # Every non-2xx body is OpenAI's error envelope, CORS refusals included.
        assert_error(response, response.status_code)
    simple = http.get("/v1/models", headers={"Origin": evil})
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


# =============================================================================================
# Invalid requests: each gets its 4xx, OpenAI's envelope, the right `param` (and `code`)
# =============================================================================================


def _json(body: Any) -> dict[str, Any]:
    return {"json": body}


def _raw(content: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": content, "headers": {"Content-Type": content_type}}


def _chat(**changes: Any) -> dict[str, Any]:
    body = chat_body(max_tokens=1)
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return _json(body)


def _completion(**changes: Any) -> dict[str, Any]:
    body = completion_body(max_tokens=1)
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return _json(body)


DROP = object()
ANY = ...
USER = {"role": "user", "content": "Hi"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE_PART = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
LONG_PROMPT = "hello " * (DEFAULT_MAX_MODEL_LEN + 50)

# (id, method, path, request kwargs, status, param, code). param: exact, a tuple of choices, or a
# 'prefix*'; ANY (...) means "not checked". code: the OpenAI code where OpenAI has one, else ANY.
INVALID_REQUESTS = [
    # --- the body itself ---
    ("malformed_json", "POST", CHAT_PATH, _raw(b'{"model": "x", "messages": ['), 400, None, ANY),
    ("array_body", "POST", CHAT_PATH, _json([chat_body()]), 400, None, ANY),
    ("string_body", "POST", CHAT_PATH, _json("hello"), 400, None, ANY),
    ("null_body", "POST", COMPLETIONS_PATH, _raw(b"null"), 400, None, ANY),
    ("empty_body", "POST", COMPLETIONS_PATH, _raw(b""), 400, None, ANY),
    ("text_plain_content_type", "POST", CHAT_PATH, _raw(json.dumps(chat_body()).encode(), "text/plain"), 415, None, ANY),
    ("form_content_type", "POST", COMPLETIONS_PATH, _raw(b"model=x&prompt=y", "application/x-www-form-urlencoded"), 415, None, ANY),
    # --- routes and methods ---
    ("unknown_route", "GET", "/v1/nope", {}, 404, None, ANY),
    ("unknown_route_post", "POST", "/v1/chat/complete", _json(chat_body()), 404, None, ANY),
    ("get_on_chat", "GET", CHAT_PATH, {}, 405, None, ANY),
    ("get_on_completions", "GET", COMPLETIONS_PATH, {}, 405, None, ANY),
    ("delete_models", "DELETE", "/v1/models", {}, 405, None, ANY),
    # --- chat: required fields and types ---
    ("chat_missing_messages", "POST", CHAT_PATH, _chat(messages=DROP), 400, "messages", "missing_required_parameter"),
    ("chat_missing_model", "POST", CHAT_PATH, _chat(model=DROP), 400, "model", "missing_required_parameter"),
    ("chat_messages_object", "POST", CHAT_PATH, _chat(messages=USER), 400, "messages", "invalid_type"),
    ("chat_messages_empty", "POST", CHAT_PATH, _chat(messages=[]), 400, "messages", "empty_array"),
    ("chat_unknown_role", "POST", CHAT_PATH, _chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages[0].role", "invalid_value"),
    ("chat_missing_role", "POST", CHAT_PATH, _chat(messages=[{"content": "Hi"}]), 400, "messages[0].role", "missing_required_parameter"),
    ("chat_content_number", "POST", CHAT_PATH, _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "invalid_type"),
    ("chat_missing_content", "POST", CHAT_PATH, _chat(messages=[{"role": "user"}]), 400, "messages[0].content", "missing_required_parameter"),
    ("chat_temperature_string", "POST", CHAT_PATH, _chat(temperature="0.5"), 400, "temperature", "invalid_type"),
    ("chat_n_bool", "POST", CHAT_PATH, _chat(n=True), 400, "n", "invalid_type"),
    ("chat_stream_string", "POST", CHAT_PATH, _chat(stream="yes"), 400, "stream", "invalid_type"),
    ("chat_max_tokens_string", "POST", CHAT_PATH, _chat(max_tokens="10"), 400, "max_tokens", "invalid_type"),
    ("chat_seed_string", "POST", CHAT_PATH, _chat(seed="abc"), 400, "seed", "invalid_type"),
    ("chat_user_number", "POST", CHAT_PATH, _chat(user=5), 400, "user", "invalid_type"),
    ("chat_include_usage_string", "POST", CHAT_PATH, _chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", "invalid_type"),
    # --- chat: ranges ---
    ("chat_temperature_3", "POST", CHAT_PATH, _chat(temperature=3), 400, "temperature", "decimal_above_max_value"),
    ("chat_temperature_negative", "POST", CHAT_PATH, _chat(temperature=-0.5), 400, "temperature", "decimal_below_min_value"),
    ("chat_top_p_1_5", "POST", CHAT_PATH, _chat(top_p=1.5), 400, "top_p", "decimal_above_max_value"),
    ("chat_n_0", "POST", CHAT_PATH, _chat(n=0), 400, "n", "integer_below_min_value"),
    ("chat_n_129", "POST", CHAT_PATH, _chat(n=129), 400, "n", "integer_above_max_value"),
    ("chat_max_tokens_0", "POST", CHAT_PATH, _chat(max_tokens=0), 400, "max_tokens", "integer_below_min_value"),
    ("chat_max_completion_tokens_0", "POST", CHAT_PATH, _chat(max_completion_tokens=0), 400, "max_completion_tokens", "integer_below_min_value"),
    ("chat_presence_penalty_3", "POST", CHAT_PATH, _chat(presence_penalty=3), 400, "presence_penalty", "decimal_above_max_value"),
    ("chat_frequency_penalty_-2_5", "POST", CHAT_PATH, _chat(frequency_penalty=-2.5), 400, "frequency_penalty", "decimal_below_min_value"),
    ("chat_top_logprobs_21", "POST", CHAT_PATH, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "integer_above_max_value"),
    ("chat_logit_bias_101", "POST", CHAT_PATH, _chat(logit_bias={"50": 101}), 400, "logit_bias*", ANY),
    ("chat_logit_bias_key_abc", "POST", CHAT_PATH, _chat(logit_bias={"abc": 1}), 400, "logit_bias*", ANY),
    ("chat_logit_bias_key_out_of_vocab", "POST", CHAT_PATH, _chat(logit_bias={"999999": 1}), 400, "logit_bias*", ANY),
    ("chat_stop_5_items", "POST", CHAT_PATH, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "array_above_max_length"),
    ("chat_stop_number", "POST", CHAT_PATH, _chat(stop=5), 400, "stop", "invalid_type"),
    ("chat_top_k_-2", "POST", CHAT_PATH, _chat(top_k=-2), 400, "top_k", "integer_below_min_value"),
    ("chat_min_p_1_5", "POST", CHAT_PATH, _chat(min_p=1.5), 400, "min_p", "decimal_above_max_value"),
    ("chat_repetition_penalty_0", "POST", CHAT_PATH, _chat(repetition_penalty=0), 400, "repetition_penalty", ANY),
    # --- chat: combinations ---
    ("chat_top_logprobs_without_logprobs", "POST", CHAT_PATH, _chat(top_logprobs=2), 400, "top_logprobs", ANY),
    ("chat_stream_options_without_stream", "POST", CHAT_PATH, _chat(stream_options={"include_usage": True}), 400, "stream_options", ANY),
    ("chat_min_tokens_over_max", "POST", CHAT_PATH, _chat(min_tokens=5, max_tokens=2), 400, "min_tokens", ANY),
    ("chat_continue_final_without_assistant", "POST", CHAT_PATH, _chat(continue_final_message=True), 400, "continue_final_message", ANY),
    ("chat_tool_choice_without_tools", "POST", CHAT_PATH, _chat(tool_choice="auto"), 400, "tool_choice", ANY),
    ("chat_context_overflow", "POST", CHAT_PATH, _chat(max_tokens=DEFAULT_MAX_MODEL_LEN), 400, ("messages", "max_tokens"), "context_length_exceeded"),
    ("chat_context_overflow_stream", "POST", CHAT_PATH, _chat(max_tokens=DEFAULT_MAX_MODEL_LEN, stream=True), 400, ("messages", "max_tokens"), "context_length_exceeded"),
    ("chat_unknown_model", "POST", CHAT_PATH, _chat(model="gpt-17"), 404, "model", "model_not_found"),
    # --- chat: tools and structured outputs ---
    ("chat_tool_choice_named_not_in_tools", "POST", CHAT_PATH, _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "tool_choice", ANY),
    ("chat_tool_choice_required_without_tools", "POST", CHAT_PATH, _chat(tool_choice="required"), 400, "tool_choice", ANY),
    ("chat_tool_schema_bad_type", "POST", CHAT_PATH, _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]), 400, "tools[0].function.parameters", ANY),
    ("chat_tool_schema_not_object", "POST", CHAT_PATH, _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), 400, "tools[0].function.parameters", ANY),
    ("chat_tool_schema_dangling_ref", "POST", CHAT_PATH, _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}}}], tool_choice="required"), 400, "tools[0].function.parameters", ANY),
    ("chat_tool_type_custom", "POST", CHAT_PATH, _chat(tools=[{"type": "custom", "custom": {"name": "f"}}]), 400, "tools*", ANY),
    ("chat_tools_and_functions", "POST", CHAT_PATH, _chat(tools=[TOOL], functions=[TOOL["function"]]), 400, "functions", ANY),
    ("chat_function_call_without_functions", "POST", CHAT_PATH, _chat(function_call="auto"), 400, "function_call", ANY),
    ("chat_function_call_named_unknown", "POST", CHAT_PATH, _chat(functions=[TOOL["function"]], function_call={"name": "nope"}), 400, "function_call", ANY),
    ("chat_json_schema_without_schema", "POST", CHAT_PATH, _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format*", ANY),
    ("chat_json_schema_without_name", "POST", CHAT_PATH, _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}), 400, "response_format*", ANY),
    ("chat_json_schema_not_object", "POST", CHAT_PATH, _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "abc"}}), 400, "response_format*", ANY),
    ("chat_json_schema_strict_unsupported", "POST", CHAT_PATH, _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}), 400, "response_format", ANY),
    ("chat_response_format_unknown_type", "POST", CHAT_PATH, _chat(response_format={"type": "yaml"}), 400, "response_format*", ANY),
    ("chat_guided_regex_lookahead", "POST", CHAT_PATH, _chat(guided_regex="(?=a)b"), 400, "guided_regex", ANY),
    ("chat_guided_choice_empty", "POST", CHAT_PATH, _chat(guided_choice=[]), 400, "guided_choice", ANY),
    ("chat_structured_outputs_none_set", "POST", CHAT_PATH, _chat(structured_outputs={}), 400, "structured_outputs", ANY),
    ("chat_structured_outputs_two_set", "POST", CHAT_PATH, _chat(structured_outputs={"regex": "a", "choice": ["a"]}), 400, "structured_outputs", ANY),
    ("chat_structured_outputs_bad_grammar", "POST", CHAT_PATH, _chat(structured_outputs={"grammar": "start: undefined_rule"}), 400, "structured_outputs", ANY),
    ("chat_two_constraints", "POST", CHAT_PATH, _chat(response_format={"type": "json_object"}, guided_regex="a+"), 400, "guided_regex", ANY),
    ("chat_guided_json_not_json", "POST", CHAT_PATH, _chat(guided_json="{not json"), 400, "guided_json", ANY),
    # --- chat: features not served ---
    ("chat_audio_modality", "POST", CHAT_PATH, _chat(modalities=["text", "audio"]), 400, "modalities", ANY),
    ("chat_audio_output", "POST", CHAT_PATH, _chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio", ANY),
    ("chat_web_search", "POST", CHAT_PATH, _chat(web_search_options={}), 400, "web_search_options", ANY),
    ("chat_image_part", "POST", CHAT_PATH, _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE_PART]}]), 400, "messages*", ANY),
    ("chat_audio_part", "POST", CHAT_PATH, _chat(messages=[{"role": "user", "content": [AUDIO_PART]}]), 400, "messages*", ANY),
    ("chat_file_part", "POST", CHAT_PATH, _chat(messages=[{"role": "user", "content": [FILE_PART]}]), 400, "messages*", ANY),
    # --- completions ---
    ("completion_json_schema_without_schema", "POST", COMPLETIONS_PATH, _completion(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format*", ANY),
    ("completion_guided_json_bad_type", "POST", COMPLETIONS_PATH, _completion(guided_json={"type": "objekt"}), 400, "guided_json", ANY),
    ("completion_missing_prompt", "POST", COMPLETIONS_PATH, _completion(prompt=DROP), 400, "prompt", "missing_required_parameter"),
    ("completion_missing_model", "POST", COMPLETIONS_PATH, _completion(model=DROP), 400, "model", "missing_required_parameter"),
    ("completion_prompt_number", "POST", COMPLETIONS_PATH, _completion(prompt=5), 400, "prompt", "invalid_type"),
    ("completion_prompt_empty_list", "POST", COMPLETIONS_PATH, _completion(prompt=[]), 400, "prompt", "empty_array"),
    ("completion_prompt_empty_token_list", "POST", COMPLETIONS_PATH, _completion(prompt=[[]]), 400, "prompt*", ANY),
    ("completion_prompt_negative_token", "POST", COMPLETIONS_PATH, _completion(prompt=[-1]), 400, "prompt*", ANY),
    ("completion_prompt_token_out_of_vocab", "POST", COMPLETIONS_PATH, _completion(prompt=[1, 999999]), 400, "prompt*", ANY),
    ("completion_logprobs_6", "POST", COMPLETIONS_PATH, _completion(logprobs=6), 400, "logprobs", "integer_above_max_value"),
    ("completion_logprobs_bool", "POST", COMPLETIONS_PATH, _completion(logprobs=True), 400, "logprobs", "invalid_type"),
    ("completion_echo_string", "POST", COMPLETIONS_PATH, _completion(echo="yes"), 400, "echo", "invalid_type"),
    ("completion_max_tokens_negative", "POST", COMPLETIONS_PATH, _completion(max_tokens=-1), 400, "max_tokens", "integer_below_min_value"),
    ("completion_best_of_below_n", "POST", COMPLETIONS_PATH, _completion(best_of=1, n=2), 400, "best_of", ANY),
    ("completion_best_of_21", "POST", COMPLETIONS_PATH, _completion(best_of=21), 400, "best_of", "integer_above_max_value"),
    ("completion_best_of_with_stream", "POST", COMPLETIONS_PATH, _completion(best_of=2, stream=True), 400, "best_of", ANY),
    ("completion_temperature_3", "POST", COMPLETIONS_PATH, _completion(temperature=3), 400, "temperature", "decimal_above_max_value"),
    ("completion_stop_5_items", "POST", COMPLETIONS_PATH, _completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", "array_above_max_length"),
    ("completion_stream_options_without_stream", "POST", COMPLETIONS_PATH, _completion(stream_options={"include_usage": True}), 400, "stream_options", ANY),
    ("completion_max_tokens_0_without_echo", "POST", COMPLETIONS_PATH, _completion(max_tokens=0), 400, "max_tokens", ANY),
    ("chat_template_kwargs_reserved_name", "POST", CHAT_PATH, _chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs", ANY),
    ("chat_stop_token_id_out_of_vocab", "POST", CHAT_PATH, _chat(stop_token_ids=[999999]), 400, "stop_token_ids", ANY),
    ("completion_suffix_without_fim", "POST", COMPLETIONS_PATH, _completion(suffix="The end."), 400, "suffix", ANY),
    ("completion_prompt_over_context", "POST", COMPLETIONS_PATH, _completion(prompt=LONG_PROMPT), 400, ("prompt", "max_tokens"), "context_length_exceeded"),
    ("completion_max_tokens_over_context", "POST", COMPLETIONS_PATH, _completion(max_tokens=DEFAULT_MAX_MODEL_LEN + 1), 400, ("prompt", "max_tokens"), "context_length_exceeded"),
    ("completion_unknown_model", "POST", COMPLETIONS_PATH, _completion(model="gpt-17"), 404, "model", "model_not_found"),
    # --- tokenize / detokenize ---
    ("tokenize_unknown_model", "POST", "/tokenize", _json({"model": "gpt-17", "prompt": "x"}), 404, "model", "model_not_found"),
    ("tokenize_prompt_number", "POST", "/tokenize", _json({"model": DEFAULT_MODEL, "prompt": 5}), 400, "prompt", "invalid_type"),
    ("detokenize_negative_token", "POST", "/detokenize", _json({"model": DEFAULT_MODEL, "tokens": [-1]}), 400, "tokens*", ANY),
    ("detokenize_token_out_of_vocab", "POST", "/detokenize", _json({"model": DEFAULT_MODEL, "tokens": [999999]}), 400, "tokens*", ANY),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param", "code"),
    [row[1:] for row in INVALID_REQUESTS],
    ids=[row[0] for row in INVALID_REQUESTS],
)
def test_invalid_request(http, method, path, kwargs, status, param, code):
    response = http.request(method, path, **kwargs)
    assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:1000]}"
    assert_error(response, status, param=param, code=code)


def test_invalid_request_table_is_big_enough():
    assert len(INVALID_REQUESTS) >= 40
    assert len({row[0] for row in INVALID_REQUESTS}) == len(INVALID_REQUESTS)


def test_context_overflow_message_names_the_numbers(http, server):
    body = chat_body(max_tokens=server.max_model_len)
    prompt_tokens = tokenize_count(http, messages=body["messages"])
    error = assert_error(http.post(CHAT_PATH, json=body), 400, code="context_length_exceeded")
    assert str(server.max_model_len) in error["message"]
    assert str(prompt_tokens + server.max_model_len) in error["message"] or str(prompt_tokens) in error["message"], error


def test_server_still_serves_after_the_bad_requests(http):
    # Runs after the table (pytest keeps file order): nothing above may have hurt the server.
    body = ok_json(http.post(CHAT_PATH, json={**PARIS_REQUEST, "max_tokens": 8}))
    assert "Paris" in body["choices"][0]["message"]["content"]
    health = wait_for_health(http, lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert health["status"] == "ok"


# =============================================================================================
# Client disconnect aborts the request
# =============================================================================================


def test_client_disconnect_aborts_the_request(http):
    before = wait_for_health(http, lambda h: h["running"] == 0 and h["waiting"] == 0)
    body = chat_body("Tell me a long story.", max_tokens=900, ignore_eos=True, stream=True)
    with http.stream("POST", CHAT_PATH, json=body) as response:
        assert response.status_code == 200
        # Keep the line iterator referenced: a dropped one is closed by the garbage collector, and
        # closing it closes the connection, which would be the disconnect before we mean it.
        lines = response.iter_lines()
        data_lines = 0
        for line in lines:
            data_lines += line.startswith("data: ")
            if data_lines >= 4:
                break
        during = ok_json(http.get("/health"))
        assert during["running"] == 1, during
        # (Not `>`: with a large KV budget a few blocks may round to the same usage figure.)
        assert during["kv_cache_usage"] >= before["kv_cache_usage"], (before, during)
    # Leaving the block closes the connection mid-stream: the server must abort within ~a second.
    closed_at = time.monotonic()
    after = wait_for_health(
        http,
        lambda h: h["running"] == 0 and h["waiting"] == 0 and h["kv_cache_usage"] <= before["kv_cache_usage"] + 1e-9,
        timeout=2.0,
    )
    assert time.monotonic() - closed_at < 2.0, after


# =============================================================================================
# The strict server: API keys, strict fields, body limit, served names, queue limit, keep-alives
# =============================================================================================


def strict_chat(**fields: Any) -> dict[str, Any]:
    return {"model": STRICT_MODEL_NAMES[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def test_api_key_is_required(strict_server, anon_strict_http, response_checker):
    assert_error(anon_strict_http.get("/v1/models"), 401)
    assert_error(anon_strict_http.post(CHAT_PATH, json=strict_chat()), 401)
    # Authentication comes before validation: a bad body without a key is still a 401.
    assert_error(anon_strict_http.post(CHAT_PATH, json={"nonsense": True}), 401)
    wrong = anon_strict_http.get("/v1/models", headers={"Authorization": "Bearer not-the-key"})
    assert_error(wrong, 401)
    not_bearer = anon_strict_http.get("/v1/models", headers={"Authorization": STRICT_KEYS[0]})
    assert_error(not_bearer, 401)
    # Both keys from the comma-separated HERON_API_KEY work.
    for key in STRICT_KEYS:
        with make_client(strict_server.base_url, response_checker, api_key=key) as client:
            assert client.get("/v1/models").status_code == 200
            body = ok_json(client.post(CHAT_PATH, json=strict_chat(max_tokens=1)))
            assert body["model"] == STRICT_MODEL_NAMES[0]


def test_strict_fields_reject_unknown_fields(strict_http):
    error = assert_error(strict_http.post(CHAT_PATH, json=strict_chat(foo=1)), 400)
    assert error["message"] == "Unrecognized request argument supplied: foo"
    nested = strict_chat()
    nested["messages"][0]["bar"] = 2
    error = assert_error(strict_http.post(CHAT_PATH, json=nested), 400)
    assert "Unrecognized request argument supplied" in error["message"] and "bar" in error["message"]
    error = assert_error(
        strict_http.post(COMPLETIONS_PATH, json={"model": STRICT_MODEL_NAMES[0], "prompt": "x", "max_tokens": 1, "baz": 1}),
        400,
    )
    assert error["message"] == "Unrecognized request argument supplied: baz"
    # Known fields, OpenAI's and vLLM's, pass.
    ok_json(strict_http.post(CHAT_PATH, json=strict_chat(max_tokens=1, top_k=5, user="u", seed=1)))


def test_request_body_over_the_limit_is_413(strict_http):
    big = strict_chat()
    big["messages"][0]["content"] = "x" * (STRICT_MAX_BODY_BYTES + 100)
    payload = json.dumps(big).encode()
    assert_error(strict_http.post(CHAT_PATH, content=payload, headers={"Content-Type": "application/json"}), 413)

    # Without Content-Length (chunked transfer), the limit still holds.
    def chunks():
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    assert_error(strict_http.post(CHAT_PATH, content=chunks(), headers={"Content-Type": "application/json"}), 413)
    # The server is fine afterwards.
    ok_json(strict_http.post(CHAT_PATH, json=strict_chat(max_tokens=1)))


def test_served_model_names_and_aliases(strict_http):
    ids = [card["id"] for card in ok_json(strict_http.get("/v1/models"))["data"]]
    assert set(STRICT_MODEL_NAMES) <= set(ids), ids
    ok_json(strict_http.get(f"/v1/models/{STRICT_MODEL_NAMES[1]}"))
    body = ok_json(strict_http.post(CHAT_PATH, json=strict_chat(model=STRICT_MODEL_NAMES[1], max_tokens=1)))
    assert body["model"] in STRICT_MODEL_NAMES
    # The model's own name is not served when names are given.
    assert_error(strict_http.post(CHAT_PATH, json=strict_chat(model=DEFAULT_MODEL)), 404, param="model", code="model_not_found")


def test_full_queue_gives_429_and_waiting_streams_get_keepalives(strict_server, strict_http, response_checker):
    # --max-num-seqs 1 --max-queue-len 1: A runs, B waits, C is turned away.
    wait_for_health(strict_http, lambda h: h["running"] == 0 and h["waiting"] == 0)
    waiting_result: dict[str, Any] = {}

    def run_b() -> None:
        with make_client(strict_server.base_url, response_checker, api_key=strict_server.api_key) as client:
            with client.stream("POST", CHAT_PATH, json=strict_chat(max_tokens=2, stream=True)) as b:
                waiting_result["status"] = b.status_code
                waiting_result["raw"] = b.read()

    with strict_http.stream("POST", CHAT_PATH, json=strict_chat(max_tokens=200, ignore_eos=True, stream=True)) as a:
        assert a.status_code == 200
        a_lines = a.iter_lines()  # kept referenced: dropping it would close A's connection early
        next(line for line in a_lines if line.startswith("data: "))
        wait_for_health(strict_http, lambda h: h["running"] == 1)
        b_thread = threading.Thread(target=run_b, daemon=True)
        b_started = time.monotonic()
        b_thread.start()
        wait_for_health(strict_http, lambda h: h["waiting"] == 1)
        rejected = strict_http.post(CHAT_PATH, json=strict_chat(max_tokens=1))
        assert_error(rejected, 429)
        retry_after = rejected.headers.get("retry-after")
        assert retry_after is not None and retry_after.strip().isdigit(), rejected.headers
        # Let B wait long enough for several keep-alives (one every 0.3 s).
        time.sleep(max(0.0, b_started + 1.2 - time.monotonic()))
    # A disconnected: B gets the slot and finishes.
    b_thread.join(timeout=30)
    assert not b_thread.is_alive(), "the waiting request never finished after the running one was dropped"
    assert waiting_result["status"] == 200
    sse = parse_sse(waiting_result["raw"])
    assert sse.done
    assert sse.comments, "a stream waiting in the queue got no keep-alive comments"
    # The keep-alives came while B waited, i.e. before its first generated text (the role chunk
    # may come first).
    first_comment = next(i for i, event in enumerate(sse.events) if event.startswith(":"))
    first_text = next(
        i for i, event in enumerate(sse.events)
        if event.startswith("data: {") and any(c["delta"].get("content") for c in json.loads(event[6:])["choices"])
    )
    assert first_comment < first_text, sse.events[:8]
    choices, _ = summarize_stream(sse.chunks, chat=True, include_usage=False)
    assert choices[0].finish_reason in ("stop", "length")


def test_startup_log_names_model_and_url(server):
    log = server.log_text()
    assert "SmolLM2" in log
    assert f"127.0.0.1:{server.port}" in log
    assert "Traceback" not in log
