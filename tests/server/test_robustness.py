"""One request can never stop, crash or stall the server, walk around its limits or see another
tenant's prompts: each finding of the probe behind issue 21, as a single request against a real
`heron serve`, with a bystander request running beside it that must complete normally (the same
greedy text as when it runs alone) and `/health` still 200 afterwards.

The servers here are this module's own: `guarded` has two API keys and small per-request caps,
`open_limited` has no keys and a per-address rate limit, and one server per test is started with
a patched engine where a test needs the engine itself to fail.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from server_helpers import DEFAULT_MODEL, start_server, stop_server

KEY_A, KEY_B = "sk-robust-a", "sk-robust-b"
MAX_PROMPTS = 8
MAX_PROMPT_TOKENS = 600
MAX_SEQS, MAX_QUEUE = 2, 2
BYSTANDER = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Name three colours."}],
    "max_tokens": 12,
    "temperature": 0,
}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    srv = start_server(
        "guarded",
        tmp_path_factory.mktemp("heron-guarded"),
        [
            "--max-model-len", "1024",
            "--max-num-seqs", str(MAX_SEQS),
            "--max-queue-len", str(MAX_QUEUE),
            "--max-prompts-per-request", str(MAX_PROMPTS),
            "--max-prompt-tokens-per-request", str(MAX_PROMPT_TOKENS),
        ],
        env={"HERON_API_KEY": f"{KEY_A},{KEY_B}"},
        api_key=KEY_A,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def http(guarded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.base_url, headers=_auth(KEY_A), timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def bystander_text(http) -> str:
    """What the bystander's greedy request answers when it runs alone."""
    response = http.post("/v1/chat/completions", json=BYSTANDER)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@contextmanager
def bystander(server, expected_text: str):
    """A streamed greedy request running beside the block; it must finish normally with the
    text it gets alone, and /health must answer 200 once the block is done."""
    result: dict = {}

    def run() -> None:
        try:
            text, finish = [], None
            with httpx.Client(base_url=server.base_url, headers=_auth(KEY_A), timeout=120) as client:
                with client.stream("POST", "/v1/chat/completions", json={**BYSTANDER, "stream": True}) as response:
                    result["status"] = response.status_code
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        for choice in chunk["choices"]:
                            text.append(choice["delta"].get("content") or "")
                            finish = choice.get("finish_reason") or finish
            result["text"], result["finish"] = "".join(text), finish
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive(), "the bystander request never finished"
    assert "error" not in result, result.get("error")
    assert result["status"] == 200
    assert result["finish"] in ("stop", "length") and result["text"] == expected_text, result
    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert health.status_code == 200, health.text


# Polls /health from a process of its own: in this one, sending a 10 MB body holds the GIL in
# spells that would show up as /health latency although the server answered at once.
_HEALTH_POLLER = textwrap.dedent(
    """
    import json, sys, threading, time
    import httpx

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    latencies, problems = [], []
    with httpx.Client(base_url=sys.argv[1], timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status = client.get("/health").status_code
            except httpx.HTTPError as exc:
                problems.append(repr(exc))
                break
            latencies.append(time.perf_counter() - start)
            if status != 200:
                problems.append(f"/health answered {status}")
            if len(latencies) == 1:
                print("ready", flush=True)
            time.sleep(0.01)
    print(json.dumps({"latencies": latencies, "problems": problems}), flush=True)
    """
)


@contextmanager
def health_latencies(server) -> Iterator[None]:
    """Poll /health every 10 ms while the block runs; every answer must be 200 within 100 ms."""
    poller = subprocess.Popen(
        [sys.executable, "-c", _HEALTH_POLLER, server.base_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert poller.stdout.readline().strip() == "ready"  # polling before the request goes out
        yield
        time.sleep(0.05)
        report, _ = poller.communicate("stop\n", timeout=30)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()
    result = json.loads(report.strip().splitlines()[-1])
    assert not result["problems"], result["problems"]
    assert result["latencies"] and max(result["latencies"]) < 0.1, sorted(result["latencies"])[-5:]


# ---------------------------------------------------------------------------------------------
# 1. Sampling values the engine cannot hold are refused; the engine keeps serving
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"top_k": 2**63}, "top_k"),
        ("/v1/completions", {"top_k": 10**30}, "top_k"),
        ("/v1/chat/completions", {"max_tokens": 2**41}, "max_tokens"),
        ("/v1/chat/completions", {"min_tokens": 2**40}, "min_tokens"),
        ("/v1/chat/completions", {"stop_token_ids": [2**63]}, "stop_token_ids[0]"),
        ("/v1/completions", {"seed": 2**64}, "seed"),
        ("/v1/chat/completions", {"repetition_penalty": 1e309}, "repetition_penalty"),
        # Applied at every step in the engine thread: long lists are refused, not scanned per token.
        ("/v1/chat/completions", {"stop_token_ids": list(range(5000))}, "stop_token_ids"),
        ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
    ],
)
def test_values_the_engine_cannot_hold_are_a_400(guarded, http, bystander_text, path, extra, param):
    body = {"model": DEFAULT_MODEL, "max_tokens": 4, "temperature": 1, **extra}
    if path == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    with bystander(guarded, bystander_text):
        # Raw text: 1e309 is not a float Python would write, and 2**63 must not pass as a float.
        response = http.post(path, content=json.dumps(body).replace("Infinity", "1e309"),
                             headers={"Content-Type": "application/json"})
        error = _error(response, 400)
        assert error["param"] == param, error


def test_a_5000_digit_logit_bias_key_is_a_400(guarded, http, bystander_text):
    body = {**BYSTANDER, "logit_bias": {"9" * 5000: 1}}
    with bystander(guarded, bystander_text):
        error = _error(http.post("/v1/chat/completions", json=body), 400)
        assert error["param"].startswith("logit_bias") and len(error["message"]) < 2100


# ---------------------------------------------------------------------------------------------
# 3. Large inputs: bounded, refused early, never on the event loop
# ---------------------------------------------------------------------------------------------


def test_a_100000_prompt_batch_is_refused_naming_the_flag_and_health_stays_fast(guarded, http, bystander_text):
    # Encoded up front: writing the JSON here would hold this process's GIL, stalling the poller.
    body = json.dumps({"model": DEFAULT_MODEL, "prompt": ["hi there"] * 100_000, "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    # /health latency is measured with nothing else running (a bystander's decoding on 2 cores
    # adds scheduling noise of its own); the bystander runs beside the same request after.
    with health_latencies(guarded):
        started = time.monotonic()
        response = http.post("/v1/completions", content=body, headers=headers)
        elapsed = time.monotonic() - started
    error = _error(response, 400, "too_many_prompts")
    assert "--max-prompts-per-request" in error["message"] and "100000" in error["message"]
    assert elapsed < 10, elapsed
    with bystander(guarded, bystander_text):
        _error(http.post("/v1/completions", content=body, headers=headers), 400, "too_many_prompts")


def test_a_10mb_message_is_refused_without_stalling_other_routes(guarded, http, bystander_text):
    body = json.dumps({**BYSTANDER, "messages": [{"role": "user", "content": "word " * 2_000_000}]}).encode()
    headers = {"Content-Type": "application/json"}
    with health_latencies(guarded):
        started = time.monotonic()
        response = http.post("/v1/chat/completions", content=body, headers=headers)
        elapsed = time.monotonic() - started
    error = _error(response, 400, "context_length_exceeded")
    assert error["param"] == "messages"
    assert elapsed < 5, elapsed
    with bystander(guarded, bystander_text):
        _error(http.post("/v1/chat/completions", content=body, headers=headers), 400, "context_length_exceeded")


def test_total_prompt_tokens_are_capped_naming_the_flag(guarded, http, bystander_text):
    prompt = "The heron waits in the shallow water for a fish. " * 20  # ~220 tokens each
    with bystander(guarded, bystander_text):
        response = http.post("/v1/completions", json={"model": DEFAULT_MODEL, "prompt": [prompt] * 4, "max_tokens": 1})
    error = _error(response, 400, "too_many_prompt_tokens")
    assert "--max-prompt-tokens-per-request" in error["message"]


# ---------------------------------------------------------------------------------------------
# 6. Log forging and amplification
# ---------------------------------------------------------------------------------------------


def test_a_forged_request_id_is_replaced_and_cannot_write_log_fields(guarded, http):
    forged = "fake status=200 model=admin client=10.0.0.1"
    response = http.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 1}, headers={"X-Request-Id": forged})
    assert response.status_code == 200
    given = response.headers["x-request-id"]
    assert given != forged and " " not in given and len(given) <= 128
    good = "req_" + uuid.uuid4().hex
    assert http.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 1},
                     headers={"X-Request-Id": good}).headers["x-request-id"] == good
    deadline = time.monotonic() + 5
    while given not in guarded.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in guarded.log_text().splitlines() if f"id={given}" in line)
    assert "model=admin" not in line and "10.0.0.1" not in line


def test_a_10mb_model_name_gets_a_short_404_and_a_short_log_line(guarded, http):
    name = "m" * 10_000_000
    response = http.post("/v1/chat/completions", json={**BYSTANDER, "model": name})
    _error(response, 404, "model_not_found")
    assert len(response.content) < 4096
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while request_id not in guarded.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in guarded.log_text().splitlines() if request_id in line)
    assert len(line) < 2048


# ---------------------------------------------------------------------------------------------
# 7. Limits that hold
# ---------------------------------------------------------------------------------------------


def test_admission_counts_sequences_not_requests(guarded, http):
    # 300 prompts can never fit in 2 running + 2 queued sequences: a 400 naming both flags.
    response = http.post(
        "/v1/completions", json={"model": DEFAULT_MODEL, "prompt": [[1, 2, 3]] * 3, "n": 2, "max_tokens": 1}
    )
    error = _error(response, 400, "too_many_sequences")
    assert "--max-num-seqs" in error["message"] and "--max-queue-len" in error["message"]
    # Four sequences in flight (one streamed request with n=4) fill the bound: a fifth waits its turn.
    long_request = {**BYSTANDER, "n": 4, "max_tokens": 200, "ignore_eos": True, "temperature": 1, "stream": True}
    with httpx.Client(base_url=guarded.base_url, headers=_auth(KEY_A), timeout=120) as other:
        with other.stream("POST", "/v1/chat/completions", json=long_request) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: dropping the iterator closes the response
            next(lines)  # admitted and running
            _error(http.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 1}), 429, "server_overloaded")
    deadline = time.monotonic() + 10
    while http.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 1}).status_code != 200:
        assert time.monotonic() < deadline, "the slots of a closed stream were never released"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def open_limited(tmp_path_factory):
    srv = start_server(
        "open-limited", tmp_path_factory.mktemp("heron-open-limited"), ["--rate-limit-rpm", "2"], env={}
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


def test_without_keys_the_rate_limit_counts_the_address_not_the_token(open_limited):
    body = {**BYSTANDER, "max_tokens": 1}
    statuses = []
    with httpx.Client(base_url=open_limited.base_url, timeout=60) as client:
        for _ in range(3):
            made_up = {"Authorization": f"Bearer {uuid.uuid4().hex}"}
            statuses.append(client.post("/v1/chat/completions", json=body, headers=made_up).status_code)
        assert statuses == [200, 200, 429], statuses
        assert client.get("/health").status_code == 200


def test_a_rate_limited_request_is_refused_before_its_grammar_compiles(open_limited):
    body = _schema_body(_wide_schema(3500))
    with httpx.Client(base_url=open_limited.base_url, timeout=60) as client:
        for _ in range(3):  # empty this address's bucket (the test above may have done it already)
            if client.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 1}).status_code == 429:
                break
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=body)
        elapsed = time.monotonic() - started
    _error(response, 429, "rate_limit_exceeded")
    assert elapsed < 0.5, elapsed


# ---------------------------------------------------------------------------------------------
# 8. The prefix cache does not leak prompts across tenants
# ---------------------------------------------------------------------------------------------


def _cached_tokens(http: httpx.Client, prompt: str, key: str, **extra) -> int:
    # A raw completion: no chat template, so the secret is the first thing in the prompt and no
    # shared template prefix is cached for anyone.
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 1, **extra}
    response = http.post("/v1/completions", json=body, headers=_auth(key))
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_the_prefix_cache_is_scoped_to_the_api_key(http):
    secret = f"My account number is {uuid.uuid4().hex}. " + "Please keep it safe and tell nobody. " * 8
    assert _cached_tokens(http, secret, KEY_A) == 0
    assert _cached_tokens(http, secret, KEY_A) >= 48  # the same tenant reuses its own prompt
    assert _cached_tokens(http, secret, KEY_B) == 0  # another tenant learns nothing


def test_a_request_cache_salt_separates_requests_of_one_key(http):
    prompt = f"Ticket {uuid.uuid4().hex}: " + "the printer on the third floor is jammed again. " * 8
    assert _cached_tokens(http, prompt, KEY_A, cache_salt="team-1") == 0
    assert _cached_tokens(http, prompt, KEY_A, cache_salt="team-1") >= 48
    assert _cached_tokens(http, prompt, KEY_A, cache_salt="team-2") == 0
    assert _cached_tokens(http, prompt, KEY_A) == 0


# ---------------------------------------------------------------------------------------------
# 1. A failure inside the engine ends one request; if the engine itself dies, the process exits 1
# ---------------------------------------------------------------------------------------------

# `heron serve` with two faults planted (no request can cause either today: validation stops them
# first, which is the point): max_tokens 5 makes the sampler fail on that request, max_tokens 7
# makes the scheduler itself fail, a bug of the engine loop rather than of a request.
_PATCHED_SERVER = textwrap.dedent(
    """
    import sys
    from heron.engine.scheduler import Scheduler
    from heron.worker.sampler import Sampler

    schedule, sample = Scheduler.schedule, Sampler.__call__

    def failing_schedule(self):
        if any(r.sampling_params.max_tokens == 7 for r in self.waiting):
            raise RuntimeError("scheduler state corrupted")
        return schedule(self)

    def failing_sample(self, logits, rows):
        if any(row.params.max_tokens == 5 for row in rows):
            raise IndexError("planted sampler fault")
        return sample(self, logits, rows)

    Scheduler.schedule, Sampler.__call__ = failing_schedule, failing_sample
    from heron.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@contextmanager
def patched_server(tmp_path) -> Iterator[tuple[str, subprocess.Popen, object]]:
    script = tmp_path / "patched_server.py"
    script.write_text(_PATCHED_SERVER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "patched.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield base, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_request_failing_inside_the_engine_gets_a_500_and_the_engine_serves_on(tmp_path):
    with patched_server(tmp_path) as (base, process, log):
        server = type("S", (), {"base_url": base})()
        with httpx.Client(base_url=base, timeout=60) as http:
            expected = http.post("/v1/chat/completions", json=BYSTANDER).json()["choices"][0]["message"]["content"]
            with bystander(server, expected):
                response = http.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 5})
            error = _error(response, 500, "internal_error")
            assert "IndexError" in error["message"] and response.headers["x-request-id"] in error["message"]
            with http.stream("POST", "/v1/completions",
                             json={"model": DEFAULT_MODEL, "prompt": ["a", "b"], "max_tokens": 5, "stream": True}) as stream:
                frames = [line for line in stream.iter_lines() if line.startswith("data: ")]
            assert frames[-1] == "data: [DONE]" and "internal_error" in frames[-2], frames[-3:]
            assert http.get("/health").status_code == 200
            assert http.post("/v1/chat/completions", json=BYSTANDER).status_code == 200
        assert process.poll() is None


def test_a_dead_engine_makes_the_process_exit_nonzero(tmp_path):
    with patched_server(tmp_path) as (base, process, log):
        response = httpx.post(f"{base}/v1/chat/completions", json={**BYSTANDER, "max_tokens": 7}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead", response.text
        assert process.wait(timeout=15) == 1, log.read_text()
        assert "exiting with status 1" in log.read_text()


# ---------------------------------------------------------------------------------------------
# 2, 4, 5. Grammars: bounded, compiled in a pool of their own, failing closed
# ---------------------------------------------------------------------------------------------


def _schema_body(schema: dict, **extra) -> dict:
    return {
        **BYSTANDER,
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        **extra,
    }


def _ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth - 1)}
    defs[f"d{depth - 1}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _wide_schema(count: int) -> dict:
    """A schema that takes a while to compile (3,500 properties: ~0.35 s), in nested objects of
    400 properties (one object may have 450). A fresh name per call: grammars are cached by spec."""
    tag = uuid.uuid4().hex[:8]
    groups = {
        f"g_{tag}_{start}": {
            "type": "object",
            "properties": {f"p{i}": {"type": "string"} for i in range(start, min(count, start + 400))},
        }
        for start in range(0, count, 400)
    }
    return {"type": "object", "properties": groups}


@pytest.mark.parametrize(
    "body, flag",
    [
        (_schema_body(_ref_chain(1000)), "--max-schema-depth"),
        ({**BYSTANDER, "structured_outputs": {"grammar": "root ::= r0\n" + "".join(
            f'r{i} ::= "a" r{i + 1}\n' for i in range(5999)) + 'r5999 ::= "b"\n'}}, "--max-grammar"),
        ({**BYSTANDER, "structured_outputs": {"grammar": "start: r0\n" + "".join(
            f'r{i}: "a" r{i + 1}\n' for i in range(19999)) + 'r19999: "b"\n'}}, "--max-grammar"),
    ],
    ids=["1000-ref-chain", "6000-rule-gbnf", "20000-rule-lark"],
)
def test_specs_that_crashed_the_compiler_are_a_400_naming_the_flag(guarded, http, bystander_text, body, flag):
    with bystander(guarded, bystander_text):
        error = _error(http.post("/v1/chat/completions", json=body), 400, "invalid_grammar")
    assert flag in error["message"], error


@pytest.mark.parametrize(
    "constraint",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "loop", "strict": True, "schema": {
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "self", "schema": {"$ref": "#"}}}},
        {"structured_outputs": {"regex": "[^\\x00-\\x{10FFFF}]"}},
        {"structured_outputs": {"regex": "[]"}},
    ],
    ids=["ref-cycle", "self-ref", "class-matching-nothing", "empty-class"],
)
def test_constraints_that_match_nothing_fail_closed_with_a_400(guarded, http, bystander_text, constraint):
    with bystander(guarded, bystander_text):
        response = http.post("/v1/chat/completions", json={**BYSTANDER, **constraint})
    _error(response, 400, "invalid_grammar")


@pytest.fixture(scope="module")
def compiling(tmp_path_factory):
    srv = start_server(
        "compiling", tmp_path_factory.mktemp("heron-compiling"),
        ["--grammar-compile-timeout", "30", "--drain-timeout", "1"], env={},
    )
    yield srv
    if srv.process.poll() is None:
        problem = stop_server(srv)
        assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


def _embedding_latency(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "a heron by the river"})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def _generation_time(client: httpx.Client) -> float:
    started = time.perf_counter()
    # 32 tokens: each compiled request's single step joins some of these steps (batching, not
    # compiling); over 32 steps that stays a few percent.
    response = client.post("/v1/chat/completions", json={**BYSTANDER, "max_tokens": 32, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def _compile_burst_round(client: httpx.Client, base_url: str) -> tuple[float, float, float, float]:
    """(base generation, busy generation, base embedding, busy embedding) seconds, each a median,
    busy meaning while eight large grammars compile."""
    base_gen = statistics.median(_generation_time(client) for _ in range(3))
    base_emb = statistics.median(_embedding_latency(client) for _ in range(7))
    results: list[int] = []

    def compile_one() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as own:
            # One token: what is measured is the compile, not these requests' decoding beside it.
            body = _schema_body(_wide_schema(3500), max_tokens=1)
            results.append(own.post("/v1/chat/completions", json=body).status_code)

    compilers = [threading.Thread(target=compile_one) for _ in range(8)]
    for thread in compilers:
        thread.start()
    time.sleep(0.5)  # the compiles are under way
    busy_gen = statistics.median(_generation_time(client) for _ in range(3))
    busy_emb = statistics.median(_embedding_latency(client) for _ in range(7))
    still_compiling = any(thread.is_alive() for thread in compilers)
    for thread in compilers:
        thread.join(timeout=120)
    assert still_compiling, "the compiles ended before the measurement: it measured nothing"
    assert results == [200] * 8, results
    return base_gen, busy_gen, base_emb, busy_emb


def test_eight_large_compiles_do_not_slow_other_requests_by_more_than_20_percent(compiling):
    # Three rounds, each its own eight fresh schemas, and the median round decides: on a quiet
    # two-core machine the median of three 32-token generations alone drifts by up to 20% from
    # one second to the next, so one round against a 20% bound measured the machine as much as
    # the compiles.
    with httpx.Client(base_url=compiling.base_url, timeout=120) as client:
        _generation_time(client), _embedding_latency(client)  # warm
        rounds = [_compile_burst_round(client, compiling.base_url) for _ in range(3)]
    gen_ratio = statistics.median(busy / base for base, busy, _, _ in rounds)
    assert gen_ratio <= 1.2, rounds
    # Embeddings take ~15 ms: 20% or 20 ms, whichever is more, of the round's own base.
    emb_excess = statistics.median(busy / max(1.2 * base, base + 0.02) for _, _, base, busy in rounds)
    assert emb_excess <= 1.0, rounds


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_compiles_whose_clients_left_stop_burning_cpu(compiling):
    # Six large grammars whose clients give up after 0.3 s: the one compiling may finish (it is
    # bounded by the caps), the five waiting for the compile thread must be dropped.
    def leave_early() -> None:
        with httpx.Client(base_url=compiling.base_url, timeout=0.3) as own:
            with pytest.raises(httpx.TimeoutException):
                own.post("/v1/chat/completions", json=_schema_body(_wide_schema(3500)))

    clients = [threading.Thread(target=leave_early) for _ in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    time.sleep(2.5)  # what was compiling when they left is done by now
    before = _cpu_seconds(compiling.process.pid)
    time.sleep(2.0)
    burned = _cpu_seconds(compiling.process.pid) - before
    assert burned < 0.5, f"{burned:.2f} CPU-seconds in 2 s after every client had left"
    assert httpx.get(f"{compiling.base_url}/health").status_code == 200


def test_a_compile_over_its_time_limit_is_a_400_naming_the_flag(tmp_path):
    srv = start_server("slow-compile", tmp_path, ["--grammar-compile-timeout", "0.05"], env={})
    try:
        response = httpx.post(f"{srv.base_url}/v1/chat/completions", json=_schema_body(_wide_schema(3500)), timeout=60)
        error = _error(response, 400, "invalid_grammar")
        assert "--grammar-compile-timeout" in error["message"]
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
    finally:
        assert stop_server(srv) is None


def test_sigterm_during_compiles_answers_503_never_500(compiling):
    import os
    import signal

    statuses: list[int] = []

    def compile_one() -> None:
        try:
            with httpx.Client(base_url=compiling.base_url, timeout=60) as own:
                statuses.append(own.post("/v1/chat/completions", json=_schema_body(_wide_schema(3500))).status_code)
        except httpx.TransportError:
            statuses.append(-1)  # the connection closed as the server exited

    clients = [threading.Thread(target=compile_one) for _ in range(6)]
    for thread in clients:
        thread.start()
    time.sleep(0.5)
    os.killpg(compiling.process.pid, signal.SIGTERM)
    for thread in clients:
        thread.join(timeout=60)
    assert compiling.process.wait(timeout=30) == 0
    assert 500 not in statuses and 503 in statuses, statuses
    assert all(status in (200, 503) for status in statuses), statuses
