"""Load and fault tests on the default server: concurrency must never change what a request gets.

Three black-box tests against the session's `heron serve` (conftest.py), loopback only, each bounded
by pytest-timeout and sized for a 2-core CPU (max_tokens 1-4: the point is correctness under
concurrency, not speed):

- `test_mixed_load_is_correct`: 200 requests from 64 concurrent clients mixing streaming and
  non-streaming chat and completions, n=2, logprobs, structured outputs (guided_choice and a
  json_schema), embeddings and invalid requests. Every body and SSE chunk is checked against
  OpenAI's spec by the client transport; usage is exact (ignore_eos, so completion_tokens is
  n * max_tokens, and prompt_tokens is what the same request got alone); streamed text is the sum
  of the deltas; each invalid request gets its status and OpenAI's error envelope; no 5xx; greedy
  outputs equal those of the same request sent alone before the load; afterwards the server is
  healthy with nothing running.
- `test_disconnects_mid_stream_leak_nothing`: 100 clients open long streams (max_tokens 64,
  ignore_eos) and hang up after 0-3 chunks, plus non-streaming requests abandoned by a client-side
  timeout. Afterwards no request is running or waiting, every KV block is free again, and the server
  answers as before.
- `test_memory_flat_over_load_rounds`: 4 rounds of 40 mixed requests; the server's RSS (its whole
  process tree, from /proc) must not grow by more than 50 MiB between round 2 and round 4.

Engine state is read from GET /metrics (`heron:num_requests_running`, `heron:num_requests_waiting`,
`heron:kv_cache_num_free_blocks` against `heron:kv_cache_num_blocks`, parsed with prometheus_client);
GET /health must agree (status ok, nothing running, waiting or held by the engine thread).

Clients here are async (httpx.AsyncClient) over a checking transport that feeds the same
`ResponseChecker` as the sync clients of server_helpers.py, so the autouse spec fixture in
conftest.py fails a test on any violating body or chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from server_helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_MODEL,
    ResponseChecker,
    Server,
    assert_error,
    parse_sse,
    summarize_stream,
)

pytestmark = pytest.mark.timeout(180)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
EMBEDDINGS_PATH = "/v1/embeddings"

NUM_LOAD_REQUESTS = int(os.environ.get("HERON_TEST_LOAD_REQUESTS", "200"))
NUM_LOAD_CLIENTS = 64
NUM_DISCONNECTS = int(os.environ.get("HERON_TEST_DISCONNECTS", "100"))
NUM_ABANDONED = 10  # non-streaming requests the client gives up on (read timeout) before the answer
MEMORY_ROUNDS = 4
MEMORY_ROUND_REQUESTS = int(os.environ.get("HERON_TEST_MEMORY_ROUND_REQUESTS", "40"))
MEMORY_GROWTH_LIMIT_MIB = 50
SETTLE_TIMEOUT_S = 10.0  # how long the engine gets to drop aborted requests and free their blocks
CLIENT_TIMEOUT_S = 120.0  # per request; far above what any request here needs, far below "hang"

CHAT_PROMPTS = [
    "Name a primary colour.",
    "What is the capital of France?",
    "Count from one to five.",
]
COMPLETION_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
]
EMBEDDING_INPUTS = ["The quick brown fox jumps over the lazy dog.", "東京は日本の首都です。"]
CHOICES = ["yes", "no"]
BOOLEAN_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "boolean"}}}


# =============================================================================================
# An async client whose every body and SSE chunk is checked against OpenAI's spec
# =============================================================================================


class _AsyncSSECheckingStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, checker: ResponseChecker, method: str, path: str):
        self._inner = inner
        self._checker = checker
        self._method = method
        self._path = path

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = b""
        async for part in self._inner:
            buffer = (buffer + part).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                self._checker.check_event(self._method, self._path, event)
            yield part

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AsyncCheckingTransport(httpx.AsyncBaseTransport):
    """server_helpers' checking transport, for httpx.AsyncClient."""

    def __init__(self, checker: ResponseChecker, limits: httpx.Limits):
        self._inner = httpx.AsyncHTTPTransport(limits=limits)
        self._checker = checker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        method, path = request.method, request.url.path
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            response.stream = _AsyncSSECheckingStream(response.stream, self._checker, method, path)
            return response
        await response.aread()
        self._checker.check_body(method, path, response)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def make_async_client(base_url: str, checker: ResponseChecker, *, connections: int, timeout: float = CLIENT_TIMEOUT_S) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, transport=_AsyncCheckingTransport(checker, limits), timeout=timeout)


# =============================================================================================
# Engine state, from GET /metrics
# =============================================================================================


ENGINE_METRICS = (
    "heron:num_requests_running",
    "heron:num_requests_waiting",
    "heron:kv_cache_num_free_blocks",
    "heron:kv_cache_num_blocks",
)


@dataclass
class EngineState:
    """The generation engines' queues and KV pools, summed over the served models."""

    num_running: float
    num_waiting: float
    num_free_blocks: float  # truly free plus cached blocks no request holds
    num_blocks: float
    metrics: dict[str, float]

    @property
    def idle(self) -> bool:
        return not self.num_running and not self.num_waiting and self.num_free_blocks == self.num_blocks


def _metric_sums(text: str) -> dict[str, float]:
    """Each `heron:` sample name, summed over its label sets (one set per served model)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("heron:"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def read_engine_state(client: httpx.Client) -> EngineState:
    """The engine state from GET /metrics (Prometheus text, parsed with prometheus_client)."""
    response = client.get("/metrics")
    assert response.status_code == 200, f"/metrics -> {response.status_code}: {response.text[:500]}"
    sums = _metric_sums(response.text)
    missing = [name for name in ENGINE_METRICS if name not in sums]
    assert not missing, f"/metrics lacks {missing}"
    return EngineState(*(sums[name] for name in ENGINE_METRICS), metrics=sums)


def wait_until_idle(client: httpx.Client, timeout: float = SETTLE_TIMEOUT_S) -> EngineState:
    """Poll until nothing runs or waits and every KV block is free; the last state either way."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_engine_state(client)
        if state.idle or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


class PeakSampler:
    """Polls the engine state from a thread while a load runs; remembers the most requests seen in it."""

    def __init__(self, base_url: str, interval: float = 0.05):
        self._client = httpx.Client(base_url=base_url, timeout=10.0)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_running = 0.0
        self.peak_in_engine = 0.0  # running + waiting

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                state = read_engine_state(self._client)
            except (httpx.HTTPError, AssertionError):
                continue  # a missed sample is no finding; the test's own checks judge the server
            self.peak_running = max(self.peak_running, state.num_running)
            self.peak_in_engine = max(self.peak_in_engine, state.num_running + state.num_waiting)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self._client.close()


def assert_idle(client: httpx.Client) -> EngineState:
    state = wait_until_idle(client)
    assert state.idle, (
        f"engine not idle {SETTLE_TIMEOUT_S:.0f} s after the load: {state.num_running:.0f} running, "
        f"{state.num_waiting:.0f} waiting, {state.num_blocks - state.num_free_blocks:.0f} of {state.num_blocks:.0f} KV blocks held"
    )
    health = client.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["running"] == 0 and body["waiting"] == 0, body
    assert body.get("requests", 0) == 0, f"the engine still holds request streams: {body}"
    return state


# =============================================================================================
# Request bodies, and what a correct answer to each looks like
# =============================================================================================


def chat_body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def completion_body(prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "prompt": prompt, **fields}


def greedy(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}


@dataclass
class References:
    """What each greedy request got when sent alone, before any load."""

    chat_text: dict[str, str] = field(default_factory=dict)  # prompt -> content (4 tokens)
    chat_prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_text: dict[str, str] = field(default_factory=dict)  # prompt -> text (4 tokens)
    completion_prompt_tokens: dict[str, int] = field(default_factory=dict)
    embeddings: list[list[float]] = field(default_factory=list)
    response_ids: list[str] = field(default_factory=list)  # of every generation answered under load


REFERENCE_TOKENS = 4


async def collect_references(client: httpx.AsyncClient) -> References:
    refs = References()
    for prompt in CHAT_PROMPTS:
        body = (await client.post(CHAT_PATH, json=chat_body(prompt, **greedy(REFERENCE_TOKENS)))).json()
        refs.chat_text[prompt] = body["choices"][0]["message"]["content"]
        refs.chat_prompt_tokens[prompt] = body["usage"]["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == REFERENCE_TOKENS, body
    for prompt in COMPLETION_PROMPTS:
        body = (await client.post(COMPLETIONS_PATH, json=completion_body(prompt, **greedy(REFERENCE_TOKENS)))).json()
        refs.completion_text[prompt] = body["choices"][0]["text"]
        refs.completion_prompt_tokens[prompt] = body["usage"]["prompt_tokens"]
    body = (await client.post(EMBEDDINGS_PATH, json={"model": EMBEDDING_MODEL, "input": EMBEDDING_INPUTS})).json()
    refs.embeddings = [item["embedding"] for item in body["data"]]
    # The chat prompt counts agree with /tokenize's rendering of the same messages.
    for prompt, count in refs.chat_prompt_tokens.items():
        tokenized = (await client.post("/tokenize", json={"model": DEFAULT_MODEL, "messages": chat_body(prompt)["messages"]})).json()
        assert tokenized["count"] == count, (prompt, tokenized["count"], count)
    return refs


def ok_json(response: httpx.Response, refs: References | None = None) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:1000]}"
    body = response.json()
    if refs is not None:
        refs.response_ids.append(body["id"])
    return body


def check_usage(usage: dict[str, Any], *, prompt_tokens: int, completion_tokens: int) -> None:
    assert usage["prompt_tokens"] == prompt_tokens, usage
    assert usage["completion_tokens"] == completion_tokens, usage
    assert usage["total_tokens"] == prompt_tokens + completion_tokens, usage


async def post_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], refs: References):
    async with client.stream("POST", path, json=body) as response:
        raw = await response.aread()
    assert response.status_code == 200, f"{response.status_code}: {raw[:1000]!r}"
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
    stream = parse_sse(raw)
    assert stream.done, "stream ended without data: [DONE]"
    refs.response_ids.append(stream.chunks[0]["id"])  # summarize_stream checks all chunks share it
    return stream


# Each request kind: an async check (client, refs, rng) -> None that sends one request and asserts.
Check = Callable[[httpx.AsyncClient, References, random.Random], Awaitable[None]]


async def chat_greedy(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    body = ok_json(await client.post(CHAT_PATH, json=chat_body(prompt, **greedy(REFERENCE_TOKENS))), refs)
    choice = body["choices"][0]
    assert choice["message"]["content"] == refs.chat_text[prompt], "greedy output changed under load"
    assert choice["finish_reason"] == "length", choice
    check_usage(body["usage"], prompt_tokens=refs.chat_prompt_tokens[prompt], completion_tokens=REFERENCE_TOKENS)


async def chat_greedy_stream(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    body = chat_body(prompt, **greedy(REFERENCE_TOKENS), stream=True, stream_options={"include_usage": True})
    stream = await post_stream(client, CHAT_PATH, body, refs)
    choices, usage = summarize_stream(stream.chunks, chat=True, include_usage=True)
    assert set(choices) == {0}
    assert choices[0].text == refs.chat_text[prompt], "streamed deltas do not add up to the greedy output"
    assert choices[0].finish_reason == "length"
    check_usage(usage, prompt_tokens=refs.chat_prompt_tokens[prompt], completion_tokens=REFERENCE_TOKENS)


async def completion_greedy(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(COMPLETION_PROMPTS)
    body = ok_json(await client.post(COMPLETIONS_PATH, json=completion_body(prompt, **greedy(REFERENCE_TOKENS))), refs)
    assert body["choices"][0]["text"] == refs.completion_text[prompt], "greedy output changed under load"
    check_usage(body["usage"], prompt_tokens=refs.completion_prompt_tokens[prompt], completion_tokens=REFERENCE_TOKENS)


async def completion_greedy_stream(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(COMPLETION_PROMPTS)
    body = completion_body(prompt, **greedy(REFERENCE_TOKENS), stream=True, stream_options={"include_usage": True})
    stream = await post_stream(client, COMPLETIONS_PATH, body, refs)
    choices, usage = summarize_stream(stream.chunks, chat=False, include_usage=True)
    assert choices[0].text == refs.completion_text[prompt], "streamed text does not add up to the greedy output"
    check_usage(usage, prompt_tokens=refs.completion_prompt_tokens[prompt], completion_tokens=REFERENCE_TOKENS)


async def completion_batch(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    # Two prompts in one request: two engine requests fanned back into one response.
    body = ok_json(await client.post(COMPLETIONS_PATH, json=completion_body(COMPLETION_PROMPTS, **greedy(REFERENCE_TOKENS))), refs)
    assert [c["index"] for c in body["choices"]] == [0, 1], body["choices"]
    assert [c["text"] for c in body["choices"]] == [refs.completion_text[p] for p in COMPLETION_PROMPTS]
    check_usage(
        body["usage"],
        prompt_tokens=sum(refs.completion_prompt_tokens.values()),
        completion_tokens=2 * REFERENCE_TOKENS,
    )


async def chat_n2(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    max_tokens = rng.randint(1, 3)
    fields = {"n": 2, "temperature": 1.0, "seed": rng.randrange(1000), "max_tokens": max_tokens, "ignore_eos": True}
    body = ok_json(await client.post(CHAT_PATH, json=chat_body(prompt, **fields)), refs)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1], body["choices"]
    assert all(c["finish_reason"] == "length" for c in body["choices"]), body["choices"]
    check_usage(body["usage"], prompt_tokens=refs.chat_prompt_tokens[prompt], completion_tokens=2 * max_tokens)


async def chat_n2_stream(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    max_tokens = rng.randint(1, 3)
    fields = {"n": 2, "temperature": 1.0, "max_tokens": max_tokens, "ignore_eos": True}
    stream = await post_stream(client, CHAT_PATH, chat_body(prompt, **fields, stream=True, stream_options={"include_usage": True}), refs)
    choices, usage = summarize_stream(stream.chunks, chat=True, include_usage=True)
    assert set(choices) == {0, 1}
    assert all(c.finish_reason == "length" for c in choices.values())
    check_usage(usage, prompt_tokens=refs.chat_prompt_tokens[prompt], completion_tokens=2 * max_tokens)


async def chat_logprobs(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    fields = {**greedy(REFERENCE_TOKENS), "logprobs": True, "top_logprobs": 2}
    body = ok_json(await client.post(CHAT_PATH, json=chat_body(prompt, **fields)), refs)
    choice = body["choices"][0]
    assert choice["message"]["content"] == refs.chat_text[prompt], "greedy output changed under load"
    content = choice["logprobs"]["content"]
    assert len(content) == REFERENCE_TOKENS, content
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2, entry
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(entry["logprob"], max(t["logprob"] for t in entry["top_logprobs"]), abs_tol=1e-4), entry


async def chat_logprobs_stream(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    fields = {**greedy(REFERENCE_TOKENS), "logprobs": True, "top_logprobs": 1, "stream": True}
    stream = await post_stream(client, CHAT_PATH, chat_body(prompt, **fields), refs)
    choices, _ = summarize_stream(stream.chunks, chat=True, include_usage=False)
    assert choices[0].text == refs.chat_text[prompt]
    assert "".join(entry["token"] for entry in choices[0].logprobs) == choices[0].text


async def completion_logprobs(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(COMPLETION_PROMPTS)
    body = ok_json(await client.post(COMPLETIONS_PATH, json=completion_body(prompt, **greedy(REFERENCE_TOKENS), logprobs=2)), refs)
    choice = body["choices"][0]
    assert choice["text"] == refs.completion_text[prompt], "greedy output changed under load"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == REFERENCE_TOKENS
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) == 2 for top in logprobs["top_logprobs"]), logprobs["top_logprobs"]


async def chat_guided_choice(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    fields = {"guided_choice": CHOICES, "max_tokens": 4, "temperature": 1.0}
    body = ok_json(await client.post(CHAT_PATH, json=chat_body(prompt, **fields)), refs)
    choice = body["choices"][0]
    assert choice["message"]["content"] in CHOICES, choice
    assert choice["finish_reason"] == "stop", choice


async def chat_json_schema(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    prompt = rng.choice(CHAT_PROMPTS)
    fields = {"response_format": BOOLEAN_SCHEMA, "max_tokens": 4, "temperature": 1.0}
    if rng.random() < 0.5:
        stream = await post_stream(client, CHAT_PATH, chat_body(prompt, **fields, stream=True), refs)
        choices, _ = summarize_stream(stream.chunks, chat=True, include_usage=False)
        content, finish_reason = choices[0].text, choices[0].finish_reason
    else:
        choice = ok_json(await client.post(CHAT_PATH, json=chat_body(prompt, **fields)), refs)["choices"][0]
        content, finish_reason = choice["message"]["content"], choice["finish_reason"]
    assert finish_reason == "stop", (content, finish_reason)
    assert isinstance(json.loads(content), bool), content


async def embeddings(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    body = ok_json(await client.post(EMBEDDINGS_PATH, json={"model": EMBEDDING_MODEL, "input": EMBEDDING_INPUTS}))
    assert [item["index"] for item in body["data"]] == [0, 1]
    for item, reference in zip(body["data"], refs.embeddings):
        vector = item["embedding"]
        assert len(vector) == EMBEDDING_DIM
        # Batched with other inputs under load, padding may move the last bits only.
        assert max(abs(a - b) for a, b in zip(vector, reference)) < 1e-4, "embedding changed under load"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(EMBEDDING_INPUTS), body["usage"]


async def invalid_temperature(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    path, body = rng.choice(
        [(CHAT_PATH, chat_body("Hi.", temperature=5, max_tokens=1)), (COMPLETIONS_PATH, completion_body("Hi", temperature=5, max_tokens=1))]
    )
    assert_error(await client.post(path, json=body), 400, param="temperature")


async def invalid_model(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    path, body = rng.choice(
        [
            (CHAT_PATH, {**chat_body("Hi.", max_tokens=1), "model": "gpt-17"}),
            (COMPLETIONS_PATH, {**completion_body("Hi", max_tokens=1), "model": "gpt-17"}),
            (EMBEDDINGS_PATH, {"model": "gpt-17", "input": "Hi"}),
        ]
    )
    assert_error(await client.post(path, json=body), 404, param="model", code="model_not_found")


async def invalid_other(client: httpx.AsyncClient, refs: References, rng: random.Random) -> None:
    which = rng.randrange(3)
    if which == 0:  # a chat model asked for embeddings
        response = await client.post(EMBEDDINGS_PATH, json={"model": DEFAULT_MODEL, "input": "Hi"})
        assert_error(response, 400, param="model", code="wrong_model_type")
    elif which == 1:  # not JSON
        response = await client.post(CHAT_PATH, content=b'{"model": ', headers={"content-type": "application/json"})
        assert_error(response, 400, code="invalid_json")
    else:  # n out of range while streaming
        response = await client.post(CHAT_PATH, json=chat_body("Hi.", n=0, max_tokens=1, stream=True))
        assert_error(response, 400, param="n")


# (check, weight): about 12% invalid, 8% embeddings, the rest generation of every shape.
MIX: list[tuple[Check, int]] = [
    (chat_greedy, 10),
    (chat_greedy_stream, 10),
    (completion_greedy, 6),
    (completion_greedy_stream, 6),
    (completion_batch, 4),
    (chat_n2, 6),
    (chat_n2_stream, 6),
    (chat_logprobs, 5),
    (chat_logprobs_stream, 4),
    (completion_logprobs, 4),
    (chat_guided_choice, 6),
    (chat_json_schema, 6),
    (embeddings, 8),
    (invalid_temperature, 5),
    (invalid_model, 5),
    (invalid_other, 3),
]


def plan(num_requests: int, seed: int) -> list[Check]:
    """A shuffled mix with every kind present (in proportion to its weight)."""
    total = sum(weight for _, weight in MIX)
    checks = [check for check, weight in MIX for _ in range(max(1, round(num_requests * weight / total)))]
    rng = random.Random(seed)
    while len(checks) < num_requests:
        checks.append(rng.choice(MIX)[0])
    rng.shuffle(checks)
    return checks[:num_requests]


async def run_load(client: httpx.AsyncClient, refs: References, checks: list[Check], concurrency: int, seed: int) -> list[str]:
    """Run the checks from `concurrency` workers; returns one line per failed request."""
    queue: asyncio.Queue[tuple[int, Check]] = asyncio.Queue()
    for item in enumerate(checks):
        queue.put_nowait(item)
    failures: list[str] = []

    async def worker() -> None:
        while True:
            try:
                index, check = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await check(client, refs, random.Random(seed * 100_003 + index))
            except Exception as exc:  # collect them all: the report says which kinds failed, how often
                failures.append(f"#{index} {check.__name__}: {type(exc).__name__}: {str(exc)[:600]}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def _report(failures: list[str], total: int) -> str:
    kinds = Counter(line.split(" ", 2)[1].rstrip(":") for line in failures)
    return f"{len(failures)} of {total} requests failed ({dict(kinds)}):\n" + "\n".join(failures[:20])


def _log_offset(server: Server) -> int:
    return server.log_path.stat().st_size


def _new_log_problems(server: Server, offset: int) -> list[str]:
    with server.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line or "Exception in ASGI" in line]


# =============================================================================================
# Tests
# =============================================================================================


def test_mixed_load_is_correct(server: Server, http: httpx.Client, response_checker: ResponseChecker):
    assert_idle(http)
    offset = _log_offset(server)
    checked_before = sum(response_checker.counts.values())
    checks = plan(NUM_LOAD_REQUESTS, seed=7)
    refs = References()

    async def main() -> list[str]:
        nonlocal refs
        async with make_async_client(server.base_url, response_checker, connections=NUM_LOAD_CLIENTS) as client:
            refs = await collect_references(client)
            started = time.monotonic()
            with PeakSampler(server.base_url) as sampler:
                failures = await run_load(client, refs, checks, NUM_LOAD_CLIENTS, seed=7)
            print(
                f"{len(checks)} requests from {NUM_LOAD_CLIENTS} clients in {time.monotonic() - started:.1f} s; "
                f"at most {sampler.peak_running:.0f} running, {sampler.peak_in_engine:.0f} in the engine"
            )
            # The load was concurrent in the engine, not serialized somewhere before it.
            assert sampler.peak_in_engine >= 2, "never more than one request in the engine at once"
            return failures

    failures = asyncio.run(main())
    assert not failures, _report(failures, len(checks))
    # The transport really did check the bodies and chunks (one or more per request).
    assert sum(response_checker.counts.values()) - checked_before >= len(checks)
    duplicates = [rid for rid, count in Counter(refs.response_ids).items() if count > 1]
    assert not duplicates, f"response ids shared by concurrent requests: {duplicates[:10]}"
    assert_idle(http)
    assert not _new_log_problems(server, offset), "\n".join(_new_log_problems(server, offset)[:20])


async def _hang_up_stream(base_url: str, body_path: str, body: dict[str, Any], num_chunks: int) -> int:
    """One client: open a stream, read `num_chunks` data frames (0: just the headers), hang up."""
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client:
        async with client.stream("POST", body_path, json=body) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            seen = 0
            if num_chunks:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        assert line != "data: [DONE]", "the stream ended before the client hung up"
                        seen += 1
                        if seen >= num_chunks:
                            break
            # Leaving both blocks unread closes the connection: the server sees a disconnect.
            return seen


async def _abandon(base_url: str, path: str, body: dict[str, Any]) -> None:
    """One client: a non-streaming request given up on after a short read timeout."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(CLIENT_TIMEOUT_S, read=0.5)) as client:
        try:
            response = await client.post(path, json=body)
        except httpx.ReadTimeout:
            return
        # Answered within 0.5 s (possible only if the engine was idle): must still be a good answer.
        assert response.status_code == 200, response.text[:500]


def test_disconnects_mid_stream_leak_nothing(server: Server, http: httpx.Client):
    assert_idle(http)
    offset = _log_offset(server)
    # 256 tokens: were the hang-ups not to abort them, these streams would keep the engine busy for
    # far longer than SETTLE_TIMEOUT_S, so a missed abort cannot pass unnoticed.
    long = {"max_tokens": 256, "ignore_eos": True, "temperature": 0.8, "stream": True}
    rng = random.Random(11)
    jobs: list[Awaitable[Any]] = []
    for i in range(NUM_DISCONNECTS):
        kind = i % 4
        if kind == 0:
            body, path = chat_body(rng.choice(CHAT_PROMPTS), **long), CHAT_PATH
        elif kind == 1:
            body, path = chat_body(rng.choice(CHAT_PROMPTS), **long, n=2, stream_options={"include_usage": True}), CHAT_PATH
        elif kind == 2:
            body, path = completion_body(rng.choice(COMPLETION_PROMPTS), **long, logprobs=1), COMPLETIONS_PATH
        else:  # two prompts: two engine requests behind one stream
            body, path = completion_body(COMPLETION_PROMPTS, **long), COMPLETIONS_PATH
        jobs.append(_hang_up_stream(server.base_url, path, body, num_chunks=rng.randrange(4)))
    for i in range(NUM_ABANDONED):
        path, body = (CHAT_PATH, chat_body(CHAT_PROMPTS[i % 3], max_tokens=256, ignore_eos=True))
        if i % 2:
            path, body = COMPLETIONS_PATH, completion_body(COMPLETION_PROMPTS[i % 2], max_tokens=256, ignore_eos=True, n=2)
        jobs.append(_abandon(server.base_url, path, body))

    async def main() -> list[Any]:
        return await asyncio.gather(*jobs, return_exceptions=True)

    started = time.monotonic()
    with PeakSampler(server.base_url) as sampler:
        results = asyncio.run(main())
    print(f"{len(jobs)} clients hung up in {time.monotonic() - started:.1f} s; at most {sampler.peak_running:.0f} running")
    # The hang-ups hit requests the engine was decoding, not only ones still queued.
    assert sampler.peak_running > 0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed: {[repr(e)[:300] for e in errors[:10]]}"
    # Some clients got generated tokens before hanging up, not only the role chunk.
    assert max(r for r in results[:NUM_DISCONNECTS]) >= 2

    assert_idle(http)
    # And the server still answers, unchanged.
    after = http.post(COMPLETIONS_PATH, json=completion_body(COMPLETION_PROMPTS[0], **greedy(2)))
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2, after.text
    assert not _new_log_problems(server, offset), "\n".join(_new_log_problems(server, offset)[:20])


def _tree_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def test_memory_flat_over_load_rounds(server: Server, http: httpx.Client, response_checker: ResponseChecker):
    if not os.path.exists(f"/proc/{server.process.pid}/status"):
        pytest.skip("needs /proc to read the server's memory")
    rss: list[int] = []

    async def rounds() -> list[str]:
        failures: list[str] = []
        async with make_async_client(server.base_url, response_checker, connections=16) as client:
            refs = await collect_references(client)
            for number in range(MEMORY_ROUNDS):
                checks = plan(MEMORY_ROUND_REQUESTS, seed=100 + number)
                failures += await run_load(client, refs, checks, 16, seed=100 + number)
                # Measured once the engine has let go of the round's requests.
                await asyncio.to_thread(assert_idle, http)
                rss.append(_tree_rss_bytes(server.process.pid))
        return failures

    failures = asyncio.run(rounds())
    assert not failures, _report(failures, MEMORY_ROUNDS * MEMORY_ROUND_REQUESTS)
    mib = [round(r / 2**20, 1) for r in rss]
    print(f"server RSS after each round (MiB): {mib}")
    growth = (rss[-1] - rss[1]) / 2**20
    assert growth < MEMORY_GROWTH_LIMIT_MIB, f"server RSS grew {growth:.1f} MiB from round 2 to round {MEMORY_ROUNDS}: {mib}"
