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

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
)

STARTUP_TIMEOUT_S = 90.0  # the model loads in ~3 s; generous for a loaded 2-core CI machine
SHUTDOWN_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _heron_command() -> list[str]:
    # The console script installed next to this interpreter (.venv/bin/heron), as a user runs it.
    script = Path(sys.executable).with_name("heron")
    if script.exists():
        return [str(script)]
    found = shutil.which("heron")
    if found:
        return [found]
    return [sys.executable, "-m", "heron.cli"]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # A developer's own HERON_* settings must not leak into the servers under test.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERON_")}
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(server: Server) -> str | None:
    """Ctrl-C the server's process group; SIGKILL it if it lingers. Returns a problem, if any."""
    process = server.process
    if process.poll() is not None:
        return f"{server.name} server had already exited with {process.returncode} before teardown"
    problem = None
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        if process.returncode not in (0, -signal.SIGINT, 128 + signal.SIGINT):
            problem = f"{server.name} server exited with {process.returncode} on Ctrl-C"
    except subprocess.TimeoutExpired:
        problem = f"{server.name} server did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of Ctrl-C"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # our own process group only: children too
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    return problem


def _start(
    name: str, tmp_dir: Path, args: list[str], env: dict[str, str], *, uvicorn_app: str | None = None, **info
) -> Server:
    """Start `heron serve ARGS`, or with `uvicorn_app` the importable app under plain uvicorn."""
    port = _free_port()
    if uvicorn_app is None:
        argv = [*_heron_command(), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    else:
        argv = [sys.executable, "-m", "uvicorn", uvicorn_app, "--host", "127.0.0.1", "--port", str(port), *args]
    log_path = tmp_dir / f"{name}-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_clean_env(env),
            start_new_session=True,
        )
    server = Server(name=name, base_url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path, argv=argv, **info)
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"`{' '.join(argv)}` exited with {process.returncode} during start-up")
            try:
                if httpx.get(f"{server.base_url}/health", headers=headers, timeout=2.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} server not healthy within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
    except BaseException as exc:
        _stop(server)
        raise RuntimeError(f"{exc}\n--- {log_path} (tail) ---\n{server.log_tail()}") from None


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = _start(
        "default",
        tmp_path_factory.mktemp("heron-default"),
        ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN), "--allowed-origins", ALLOWED_ORIGIN],
        env={},
        max_model_len=DEFAULT_MAX_MODEL_LEN,
    )
    yield srv
    problem = _stop(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory) -> Iterator[Server]:
    srv = _start(
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
    problem = _stop(srv)
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
