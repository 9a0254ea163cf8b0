"""Fixtures for the black-box server tests: real `heron serve` processes on the bundled model.

Two servers per session, each started once on a free loopback port and reused by every test:

- `server`: the default configuration (no keys, lenient fields) with `--max-model-len 1024`, so
  context-overflow checks need only a short prompt, and one allowed CORS origin.
- `strict_server`: the opposite corner: API keys (two, from the comma-separated HERON_API_KEY
  environment variable, so the env path is exercised too), `--strict-fields`, a 4 KiB body limit,
  served names `heron-strict` and `heron-alias`, `--max-model-len 256`, one sequence at a time with
  a one-slot waiting queue (so a third request gets 429) and SSE keep-alives every 0.3 s.

Each process runs in its own session (process group); teardown sends it Ctrl-C (SIGINT to the
group), expects a clean exit, and SIGKILLs the group whatever happens, so no server outlives the
tests. Server output goes to a log file whose tail is shown when start-up fails.

Every client built here checks every response against OpenAI's spec (server_helpers.py); the
autouse `_responses_match_openai_spec` fixture fails a test that received a violating body or chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_helpers import (
    ALLOWED_ORIGIN,
    DEFAULT_MAX_MODEL_LEN,
    SSE_KEEPALIVE_S,
    STRICT_KEYS,
    STRICT_MAX_BODY_BYTES,
    STRICT_MAX_MODEL_LEN,
    STRICT_MODEL_NAMES,
    ResponseChecker,
    Server,
    make_client,
    make_openai,
    openapi_schema,
    start_server,
    stop_server,
)

@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        "default",
        tmp_path_factory.mktemp("heron-default"),
        ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN), "--allowed-origins", ALLOWED_ORIGIN],
        env={},
        max_model_len=DEFAULT_MAX_MODEL_LEN,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        "strict",
        tmp_path_factory.mktemp("heron-strict"),
        [
            "--strict-fields",
            "--max-request-body-bytes", str(STRICT_MAX_BODY_BYTES),
            "--served-model-name", *STRICT_MODEL_NAMES,
            "--max-model-len", str(STRICT_MAX_MODEL_LEN),
            "--max-num-seqs", "1",
            "--max-queue-len", "1",
            "--sse-keepalive", str(SSE_KEEPALIVE_S),
        ],
        env={"HERON_API_KEY": ",".join(STRICT_KEYS)},
        model=STRICT_MODEL_NAMES[0],
        api_key=STRICT_KEYS[0],
        max_model_len=STRICT_MAX_MODEL_LEN,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


# ---------------------------------------------------------------------------------------------
# Clients: every one of them checks every response against the spec
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def response_checker() -> ResponseChecker:
    assert openapi_schema.spec_available(), (
        f"OpenAI spec not found at {openapi_schema.SPEC_PATH} (set HERON_OPENAI_SPEC); the server tests validate against it"
    )
    return ResponseChecker()


@pytest.fixture(autouse=True)
def _responses_match_openai_spec(response_checker: ResponseChecker) -> Iterator[None]:
    start = len(response_checker.violations)
    yield
    new = response_checker.violations[start:]
    assert not new, "responses received by this test violate the OpenAI spec:\n" + "\n\n".join(new)


@pytest.fixture(scope="session")
def http(server: Server, response_checker: ResponseChecker) -> Iterator[httpx.Client]:
    with make_client(server.base_url, response_checker) as client:
        yield client


@pytest.fixture(scope="session")
def strict_http(strict_server: Server, response_checker: ResponseChecker) -> Iterator[httpx.Client]:
    with make_client(strict_server.base_url, response_checker, api_key=strict_server.api_key) as client:
        yield client


@pytest.fixture(scope="session")
def anon_strict_http(strict_server: Server, response_checker: ResponseChecker) -> Iterator[httpx.Client]:
    """The strict server without credentials (for 401s)."""
    with make_client(strict_server.base_url, response_checker) as client:
        yield client


@pytest.fixture(scope="session")
def oai(server: Server, response_checker: ResponseChecker):
    client = make_openai(server.base_url, response_checker)
    yield client
    client.close()


@pytest.fixture(scope="session")
def strict_oai(strict_server: Server, response_checker: ResponseChecker):
    client = make_openai(strict_server.base_url, response_checker, api_key=strict_server.api_key)
    yield client
    client.close()
