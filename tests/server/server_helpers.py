"""Helpers for the black-box server tests: schema-checking HTTP clients, SSE parsing, error checks.

Every HTTP client the tests use (raw httpx and the `openai` SDK's) goes through a checking transport,
which validates each response body, and each SSE data frame as it streams past, against the
matching component schema of OpenAI's spec (tests/unit/openapi_schema.py, shared with
tests/unit/test_protocol.py). Violations are recorded in a `ResponseChecker`; an autouse fixture in
conftest.py fails the test that received them. So "every body and every chunk is validated" holds
by construction, not by each test remembering to call `assert_matches`.

Two deliberate departures from the literal spec, both for /v1/completions (see the comments in
heron/server/protocol/completions.py and test_protocol.py, which pin the same reading):
- Stream chunks are checked against CreateCompletionResponse with `finish_reason` and `usage`
  widened to allow null. OpenAI reuses the non-streaming schema for stream events, yet every
  streamed choice carries `finish_reason: null` until it ends, and stream_options.include_usage
  documents `usage: null` on all chunks but the last. Non-streaming responses get no such leeway.
- `logprobs.token_logprobs` / `logprobs.top_logprobs` items may be null: with `echo`, the first
  prompt token has no log-probability, and OpenAI (and vLLM) send null there.

The Responses API (/v1/responses): POST bodies and GET /v1/responses/{id} are checked against
`Response`, GET .../input_items against `ResponseItemList`, DELETE against {"id", "object":
"response", "deleted": true} (the spec's example; its 200 has no schema). Its streams are named
events (`event: <type>` + `data: <json>`, no [DONE]): each event is checked against the component
of its `type` (read off ResponseStreamEvent's anyOf, e.g. response.output_text.delta ->
ResponseTextDeltaEvent), its `event:` name must equal that type, sequence_number must run 0, 1,
2, ..., and a stream read to its end must end with a terminal event (response.completed /
.incomplete / .failed, or error) with nothing after it. One departure: `Response.user` and
`Response.usage` may be null, as the spec's own examples send them (response.created's shows both
null) and as OpenAI sends them while a response is in progress.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

# openapi_schema lives beside the protocol unit tests; import it from there (prepend import mode
# puts tests/unit on sys.path too when the whole suite runs, so this is the same module object).
_UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit"
if str(_UNIT_TESTS) not in sys.path:
    sys.path.insert(0, str(_UNIT_TESTS))

import openapi_schema  # noqa: E402
from openapi_schema import assert_matches, component, schema_errors  # noqa: E402,F401

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"


# =============================================================================================
# The servers under test (started by conftest.py)
# =============================================================================================

ALLOWED_ORIGIN = "http://allowed.example"
STRICT_KEYS = ("key-a", "key-b")
STRICT_MODEL_NAMES = ("heron-strict", "heron-alias")
STRICT_MAX_BODY_BYTES = 4096
STRICT_MAX_MODEL_LEN = 256
DEFAULT_MAX_MODEL_LEN = 1024
SSE_KEEPALIVE_S = 0.3


@dataclass
class Server:
    """One running `heron serve` process."""

    name: str
    base_url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    argv: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# =============================================================================================
# Server processes (here rather than in conftest.py: test modules import them, and `conftest` is
# not a unique module name across test directories)
# =============================================================================================


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


def stop_server(server: Server) -> str | None:
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


def start_server(
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
        stop_server(server)
        raise RuntimeError(f"{exc}\n--- {log_path} (tail) ---\n{server.log_tail()}") from None


# =============================================================================================
# Schemas
# =============================================================================================


def _allow_null_logprob_items(schema: dict[str, Any]) -> None:
    """Let echo's first prompt token carry null in token_logprobs / top_logprobs (see docstring)."""
    choice = schema["properties"]["choices"]["items"]["properties"]
    logprobs_object = next(branch for branch in choice["logprobs"]["anyOf"] if branch.get("type") == "object")
    for key in ("token_logprobs", "top_logprobs"):
        items = logprobs_object["properties"][key]["items"]
        logprobs_object["properties"][key]["items"] = {"anyOf": [items, {"type": "null"}]}


def completion_response_schema() -> dict[str, Any]:
    """CreateCompletionResponse, with null allowed only for echo's unscored first prompt token."""
    schema = component("CreateCompletionResponse")
    _allow_null_logprob_items(schema)
    return schema


def completion_chunk_schema() -> dict[str, Any]:
    """CreateCompletionResponse as a stream event: finish_reason and usage may also be null."""
    schema = completion_response_schema()
    choice = schema["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"]["type"] = ["string", "null"]
    choice["finish_reason"]["enum"] = [*choice["finish_reason"]["enum"], None]
    schema["properties"]["usage"] = {"anyOf": [schema["properties"]["usage"], {"type": "null"}]}
    return schema


def embedding_response_schema() -> dict[str, Any]:
    """CreateEmbeddingResponse, with `embedding` also a string: the spec types it as numbers only,
    yet `encoding_format: base64` (which the SDK itself asks for by default) returns base64 text."""
    schema = component("CreateEmbeddingResponse")
    item = schema["properties"]["data"]["items"]
    if "$ref" in item:
        item = schema["properties"]["data"]["items"] = component(item["$ref"].rsplit("/", 1)[1])
    item["properties"]["embedding"] = {"anyOf": [item["properties"]["embedding"], {"type": "string"}]}
    return schema


# What DELETE /v1/responses/{id} returns: the spec's 200 has no schema, only this example.
RESPONSE_DELETED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "object": {"const": "response"},
        "deleted": {"const": True},
    },
    "required": ["id", "object", "deleted"],
}


def response_schema() -> dict[str, Any]:
    """Response, with `user` and `usage` also null: the spec's own examples send both as null (the
    response.created example, and the Response example's `user`), as OpenAI's API does while a
    response is in progress. Everything else is as the spec says."""
    schema = component("Response")
    for index, branch in enumerate(schema["allOf"]):
        if branch.get("$ref", "").endswith("/ModelResponseProperties"):
            branch = schema["allOf"][index] = component("ModelResponseProperties")
            branch["properties"]["user"] = {"anyOf": [branch["properties"]["user"], {"type": "null"}]}
        elif "usage" in branch.get("properties", {}):
            branch["properties"]["usage"] = {"anyOf": [branch["properties"]["usage"], {"type": "null"}]}
    return schema


def response_event_schema(name: str) -> dict[str, Any]:
    """A Responses stream event component, its `response` snapshot (if any) read as `response_schema`."""
    schema = component(name)
    properties = schema.get("properties", {})
    if properties.get("response", {}).get("$ref", "").endswith("/schemas/Response"):
        properties["response"] = response_schema()
    return schema


def response_event_components() -> dict[str, str]:
    """Each Responses stream event `type` -> its component, read off ResponseStreamEvent's anyOf."""
    schemas = openapi_schema._converted_spec()["components"]["schemas"]
    out: dict[str, str] = {}
    for branch in schemas["ResponseStreamEvent"]["anyOf"]:
        name = branch["$ref"].rsplit("/", 1)[1]
        type_schema = schemas[name].get("properties", {}).get("type", {})
        for value in type_schema.get("enum") or [type_schema.get("const")]:
            if isinstance(value, str):
                out[value] = name
    return out


_EVENT_COMPONENTS: dict[str, str] = {}


def _event_component(event_type: str) -> str | None:
    if not _EVENT_COMPONENTS:
        _EVENT_COMPONENTS.update(response_event_components())
    return _EVENT_COMPONENTS.get(event_type)


def _event_component_names() -> set[str]:
    _event_component("")
    return set(_EVENT_COMPONENTS.values())


_SCHEMAS: dict[str, dict[str, Any]] = {}


def _errors(instance: Any, name: str) -> list[str]:
    """Violations of a spec component, or of one of the two patched completion schemas above."""
    if name == "completion_response":
        schema = _SCHEMAS.setdefault(name, completion_response_schema())
        return schema_errors(instance, schema=schema)
    if name == "completion_chunk":
        schema = _SCHEMAS.setdefault(name, completion_chunk_schema())
        return schema_errors(instance, schema=schema)
    if name == "embedding_response":
        schema = _SCHEMAS.setdefault(name, embedding_response_schema())
        return schema_errors(instance, schema=schema)
    if name == "response_deleted":
        return schema_errors(instance, schema=RESPONSE_DELETED_SCHEMA)
    if name == "Response":
        schema = _SCHEMAS.setdefault(name, response_schema())
        return schema_errors(instance, schema=schema)
    if name in _event_component_names():
        schema = _SCHEMAS.setdefault(name, response_event_schema(name))
        return schema_errors(instance, schema=schema)
    return schema_errors(instance, name)


def check_schema(instance: Any, name: str) -> None:
    """assert_matches, also for the two patched names 'completion_response' / 'completion_chunk'."""
    errors = _errors(instance, name)
    assert not errors, f"instance does not match {name}:\n" + "\n".join(errors) + f"\n{json.dumps(instance)[:2000]}"


def _json_component(method: str, path: str, status: int) -> str | None:
    """Which schema a JSON response body must match; None where the spec says nothing."""
    if status >= 400:
        return "ErrorResponse"
    if not 200 <= status < 300:
        return None
    if method == "POST" and path == CHAT_PATH:
        return "CreateChatCompletionResponse"
    if method == "POST" and path == COMPLETIONS_PATH:
        return "completion_response"
    if method == "POST" and path == "/v1/embeddings":
        return "embedding_response"
    if method == "GET" and path == "/v1/models":
        return "ListModelsResponse"
    if method == "GET" and path.startswith("/v1/models/"):
        return "Model"
    if path == RESPONSES_PATH and method == "POST":
        return "Response"
    if _is_response_path(path):
        return {"GET": "Response", "DELETE": "response_deleted"}.get(method)
    if _is_input_items_path(path) and method == "GET":
        return "ResponseItemList"
    return None


def _is_response_path(path: str) -> bool:
    """/v1/responses/{id}"""
    rest = path[len(RESPONSES_PATH) + 1 :] if path.startswith(RESPONSES_PATH + "/") else ""
    return bool(rest) and "/" not in rest


def _is_input_items_path(path: str) -> bool:
    """/v1/responses/{id}/input_items"""
    rest = path[len(RESPONSES_PATH) + 1 :] if path.startswith(RESPONSES_PATH + "/") else ""
    head, _, tail = rest.partition("/")
    return bool(head) and tail == "input_items"


def is_responses_stream_path(path: str) -> bool:
    """POST /v1/responses, or GET /v1/responses/{id}?stream=true: named-event SSE streams."""
    return path == RESPONSES_PATH or _is_response_path(path)


def _chunk_component(path: str) -> str | None:
    if path == CHAT_PATH:
        return "CreateChatCompletionStreamResponse"
    if path == COMPLETIONS_PATH:
        return "completion_chunk"
    return None


# =============================================================================================
# The checking transport
# =============================================================================================


# The events that end a Responses stream (`error` too: OpenAI sends nothing after it).
RESPONSES_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})


@dataclass
class ResponsesStreamState:
    """What the checker remembers across one Responses stream's events."""

    next_sequence: int = 0
    count: int = 0
    types: list[Any] = field(default_factory=list)
    terminated: bool = False


@dataclass
class ResponseChecker:
    """Collects schema violations of every response the test clients receive."""

    violations: list[str] = field(default_factory=list)
    # How many bodies / chunks were checked against which schema: lets a test prove the checking ran.
    counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, where: str, name: str, instance: Any) -> None:
        errors = _errors(instance, name)
        with self._lock:
            self.counts[name] += 1
            if errors:
                self.violations.append(
                    f"{where}: does not match {name}:\n  " + "\n  ".join(errors) + f"\n  body: {json.dumps(instance)[:1500]}"
                )

    def _violation(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)

    def check_body(self, method: str, path: str, response: httpx.Response) -> None:
        where = f"{method} {path} -> {response.status_code}"
        name = _json_component(method, path, response.status_code)
        content_type = response.headers.get("content-type", "")
        if response.status_code >= 400 and not content_type.startswith("application/json"):
            self._violation(f"{where}: error body is {content_type!r}, not JSON: {response.content[:300]!r}")
            return
        if name is None:
            return
        try:
            body = json.loads(response.content)
        except ValueError:
            self._violation(f"{where}: body is not JSON: {response.content[:300]!r}")
            return
        self._record(where, name, body)

    def check_event(self, method: str, path: str, event: bytes) -> None:
        """One SSE event (the bytes between blank lines): each `data:` frame is one JSON chunk."""
        where = f"{method} {path} (stream)"
        for line in event.decode("utf-8", errors="replace").split("\n"):
            if not line.startswith("data:"):
                continue  # comments (keep-alives) and other fields are the framing tests' business
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                self._violation(f"{where}: data frame is not JSON: {payload[:300]!r}")
                continue
            if isinstance(chunk, dict) and "error" in chunk:
                self._record(where, "ErrorResponse", chunk)
            elif (name := _chunk_component(path)) is not None:
                self._record(where, name, chunk)

    # --- Responses API streams: `event: <type>` + `data: <json>`, no [DONE] -----------------

    def check_responses_event(self, method: str, path: str, event: bytes, state: "ResponsesStreamState") -> None:
        """One SSE event of a Responses stream: named, typed as named, numbered in sequence.

        Each event must carry exactly one `event:` line and one `data:` line (comments are
        allowed, e.g. keep-alives); the data must match the component of its `type` (e.g.
        response.output_text.delta -> ResponseTextDeltaEvent); `event:` must equal that `type`;
        sequence_number must run 0, 1, 2, ...; nothing may follow the terminal event.
        """
        where = f"{method} {path} (responses stream, event #{state.count})"
        lines = event.decode("utf-8", errors="replace").split("\n")
        fields = [line for line in lines if line and not line.startswith(":")]
        if not fields:
            return  # a keep-alive comment
        names = [line[len("event:") :].strip() for line in fields if line.startswith("event:")]
        datas = [line[len("data:") :].strip() for line in fields if line.startswith("data:")]
        others = [line for line in fields if not line.startswith(("event:", "data:"))]
        state.count += 1
        if others:
            self._violation(f"{where}: unexpected SSE lines {others!r}")
        if len(names) != 1 or len(datas) != 1:
            self._violation(f"{where}: want one `event:` and one `data:` line, got {fields!r}")
            return
        if datas[0] == "[DONE]":
            self._violation(f"{where}: Responses streams end with their terminal event, not `data: [DONE]`")
            return
        try:
            data = json.loads(datas[0])
        except ValueError:
            self._violation(f"{where}: data is not JSON: {datas[0][:300]!r}")
            return
        if not isinstance(data, dict):
            self._violation(f"{where}: data is not an object: {datas[0][:300]!r}")
            return
        event_type = data.get("type")
        if names[0] != event_type:
            self._violation(f"{where}: `event: {names[0]}` but the data's type is {event_type!r}")
        if state.terminated:
            self._violation(f"{where}: {event_type!r} after the terminal {state.types[-1]!r}")
        state.types.append(event_type)
        name = _event_component(event_type) if isinstance(event_type, str) else None
        if name is None:
            self._violation(f"{where}: unknown Responses stream event type {event_type!r}: {datas[0][:300]}")
        else:
            self._record(where, name, data)
        sequence = data.get("sequence_number")
        if sequence != state.next_sequence:
            self._violation(f"{where}: sequence_number {sequence!r}, expected {state.next_sequence}")
        state.next_sequence = (sequence if isinstance(sequence, int) else state.next_sequence) + 1
        if event_type in RESPONSES_TERMINAL_EVENTS:
            state.terminated = True

    def end_responses_stream(self, method: str, path: str, state: "ResponsesStreamState") -> None:
        """The stream was read to its end: it must have ended with a terminal event."""
        if not state.terminated:
            last = state.types[-1] if state.types else None
            self._violation(f"{method} {path} (responses stream): ended after {last!r}, without a terminal event")


def _checking_transport(http_lib: ModuleType, checker: ResponseChecker) -> Any:
    """A transport of `http_lib` (httpx, or httpx2 under openai >= 3) that checks every response.

    SSE bodies pass through unchanged, each complete event checked on the way; other bodies are
    read in the transport (the client then reuses the read content) and checked whole.
    """

    class SSECheckingStream(http_lib.SyncByteStream):
        def __init__(self, inner: Any, method: str, path: str):
            self._inner = inner
            self._method = method
            self._path = path

        def __iter__(self) -> Iterator[bytes]:
            splitter = _SSESplitter(checker, self._method, self._path)
            for part in self._inner:
                splitter.feed(part)
                yield part
            splitter.end()

        def close(self) -> None:
            self._inner.close()

    class CheckingTransport(http_lib.BaseTransport):
        def __init__(self) -> None:
            self._inner = http_lib.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            response = self._inner.handle_request(request)
            method, path = request.method, request.url.path
            if method in ("OPTIONS", "HEAD"):
                return response
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                response.stream = SSECheckingStream(response.stream, method, path)
                return response
            response.read()
            checker.check_body(method, path, response)
            return response

        def close(self) -> None:
            self._inner.close()

    return CheckingTransport()


class _SSESplitter:
    """Cuts an SSE body into events as its bytes arrive and hands each to the checker.

    Chat and completion streams go to `check_event`; Responses streams (named events, sequence
    numbers, a terminal event instead of [DONE]) to `check_responses_event`, and, once the body was
    read to its end, `end_responses_stream`.
    """

    def __init__(self, checker: ResponseChecker, method: str, path: str) -> None:
        self._checker = checker
        self._method = method
        self._path = path
        self._buffer = b""
        self._responses = is_responses_stream_path(path)
        self._state = ResponsesStreamState()

    def feed(self, part: bytes) -> None:
        self._buffer = (self._buffer + part).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        if self._responses:
            self._checker.check_responses_event(self._method, self._path, event, self._state)
        else:
            self._checker.check_event(self._method, self._path, event)

    def end(self) -> None:
        if self._responses:
            if self._buffer.strip():
                self._event(self._buffer)  # an unterminated last event
                self._buffer = b""
            self._checker.end_responses_stream(self._method, self._path, self._state)


def _async_checking_transport(http_lib: ModuleType, checker: ResponseChecker) -> Any:
    """The async twin of `_checking_transport` (for AsyncOpenAI, e.g. under openai-agents)."""

    class AsyncSSECheckingStream(http_lib.AsyncByteStream):
        def __init__(self, inner: Any, method: str, path: str):
            self._inner = inner
            self._method = method
            self._path = path

        async def __aiter__(self):
            splitter = _SSESplitter(checker, self._method, self._path)
            async for part in self._inner:
                splitter.feed(part)
                yield part
            splitter.end()

        async def aclose(self) -> None:
            await self._inner.aclose()

    class AsyncCheckingTransport(http_lib.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = http_lib.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            response = await self._inner.handle_async_request(request)
            method, path = request.method, request.url.path
            if method in ("OPTIONS", "HEAD"):
                return response
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                response.stream = AsyncSSECheckingStream(response.stream, method, path)
                return response
            await response.aread()
            checker.check_body(method, path, response)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return AsyncCheckingTransport()


def make_client(base_url: str, checker: ResponseChecker, *, api_key: str | None = None, timeout: float = 60.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url, transport=_checking_transport(httpx, checker), headers=headers, timeout=timeout)


def make_openai(base_url: str, checker: ResponseChecker, *, api_key: str = "sk-no-key-needed"):
    import openai

    # openai >= 3 is built on httpx2 (same API, separate classes), older releases on httpx: the
    # transport must come from the library the SDK's client class derives from.
    http_lib = importlib.import_module(
        next(
            cls.__module__.split(".")[0]
            for cls in openai.DefaultHttpxClient.__mro__
            if cls.__name__ == "Client" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        )
    )
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=60.0,
        http_client=openai.DefaultHttpxClient(transport=_checking_transport(http_lib, checker)),
    )


def _sdk_http_lib() -> ModuleType:
    import openai

    return importlib.import_module(
        next(
            cls.__module__.split(".")[0]
            for cls in openai.DefaultAsyncHttpxClient.__mro__
            if cls.__name__ == "AsyncClient" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        )
    )


def make_async_openai(base_url: str, checker: ResponseChecker, *, api_key: str = "sk-no-key-needed"):
    """An AsyncOpenAI client whose every response is checked like `make_openai`'s."""
    import openai

    return openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=60.0,
        http_client=openai.DefaultAsyncHttpxClient(transport=_async_checking_transport(_sdk_http_lib(), checker)),
    )


# =============================================================================================
# SSE
# =============================================================================================


@dataclass
class SSEStream:
    """A fully read SSE response: the raw bytes, the events in order, the JSON chunks."""

    raw: bytes
    events: list[str]  # each event's text, without the terminating blank line
    chunks: list[dict[str, Any]]  # decoded `data:` payloads, [DONE] excluded
    done: bool  # whether `data: [DONE]` arrived
    comments: list[str]  # comment lines (": keep-alive"), in arrival order


def parse_sse(raw: bytes) -> SSEStream:
    text = raw.decode("utf-8")
    assert "\r" not in text, "SSE framing uses bare \\n line ends"
    assert text.endswith("\n\n"), f"SSE stream does not end with a blank line: {text[-200:]!r}"
    events = text[:-2].split("\n\n")
    chunks: list[dict[str, Any]] = []
    comments: list[str] = []
    done = False
    for event in events:
        for line in event.split("\n"):
            if line.startswith(":"):
                comments.append(line)
                continue
            assert line.startswith("data: "), f"unexpected SSE line {line!r} (only `data: ` frames and comments)"
            assert not done, f"data after [DONE]: {line!r}"
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
            else:
                chunks.append(json.loads(payload))
    return SSEStream(raw=raw, events=events, chunks=chunks, done=done, comments=comments)


@dataclass
class NamedEvent:
    """One event of a Responses stream: its `event:` name and its decoded `data:`."""

    name: str
    data: dict[str, Any]


def parse_named_sse(raw: bytes) -> list[NamedEvent]:
    """A Responses stream: `event: <type>` + `data: <json>` per event, comments allowed, no [DONE]."""
    text = raw.decode("utf-8")
    assert "\r" not in text, "SSE framing uses bare \\n line ends"
    assert text.endswith("\n\n"), f"SSE stream does not end with a blank line: {text[-200:]!r}"
    events: list[NamedEvent] = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
        datas = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert len(names) == 1 and len(datas) == 1 and len(lines) == 2, f"malformed Responses SSE event: {block!r}"
        assert datas[0] != "[DONE]", "a Responses stream sent data: [DONE]"
        events.append(NamedEvent(name=names[0], data=json.loads(datas[0])))
    return events


def stream_post(client: httpx.Client, path: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, SSEStream]:
    with client.stream("POST", path, json=body, **kwargs) as response:
        raw = response.read()
    assert response.status_code == 200, f"{response.status_code}: {raw[:500]!r}"
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
    return response, parse_sse(raw)


@dataclass
class StreamedChoice:
    text: str = ""
    finish_reason: str | None = None
    role: str | None = None
    num_chunks: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)


def summarize_stream(chunks: list[dict[str, Any]], *, chat: bool, include_usage: bool) -> tuple[dict[int, StreamedChoice], dict | None]:
    """Check the stream-wide invariants and fold the chunks into per-choice results.

    Invariants: one id and one created for all chunks; chat chunks' first delta per choice has
    role "assistant"; exactly one finish_reason per choice, on its last chunk; with include_usage
    every chunk has `usage: null` except a final one with `choices: []` and the usage.
    """
    assert chunks, "no chunks"
    assert len({c["id"] for c in chunks}) == 1, f"chunk ids differ: {sorted({c['id'] for c in chunks})}"
    assert len({c["created"] for c in chunks}) == 1, "chunks disagree on `created`"
    prefix = "chatcmpl-" if chat else "cmpl-"
    assert chunks[0]["id"].startswith(prefix), chunks[0]["id"]
    usage = None
    body_chunks = chunks
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == [], f"final usage chunk has choices: {last}"
        assert isinstance(last.get("usage"), dict), f"final chunk carries no usage: {last}"
        usage = last["usage"]
        body_chunks = chunks[:-1]
        for chunk in body_chunks:
            assert "usage" in chunk and chunk["usage"] is None, f"non-final chunk must carry usage: null: {chunk}"
    else:
        for chunk in chunks:
            assert chunk.get("usage") is None, f"usage sent without include_usage: {chunk}"
    choices: dict[int, StreamedChoice] = {}
    for chunk in body_chunks:
        assert chunk["choices"], f"a chunk without choices before the end: {chunk}"
        for c in chunk["choices"]:
            state = choices.setdefault(c["index"], StreamedChoice())
            assert state.finish_reason is None, f"choice {c['index']} got a chunk after its finish_reason: {chunk}"
            if chat:
                delta = c["delta"]
                if state.num_chunks == 0:
                    assert delta.get("role") == "assistant", f"first delta of choice {c['index']} lacks the role: {chunk}"
                    state.role = "assistant"
                else:
                    assert "role" not in delta or delta["role"] is None, f"role repeated: {chunk}"
                state.text += delta.get("content") or ""
                if c.get("logprobs") and c["logprobs"].get("content"):
                    state.logprobs.extend(c["logprobs"]["content"])
            else:
                state.text += c["text"]
            state.finish_reason = c["finish_reason"]
            state.num_chunks += 1
    for index, state in choices.items():
        assert state.finish_reason is not None, f"choice {index} never got a finish_reason"
    return choices, usage


# =============================================================================================
# Errors
# =============================================================================================


def assert_error(
    response: httpx.Response,
    status: int,
    *,
    param: Any = ...,
    code: Any = ...,
    message_contains: str | None = None,
) -> dict[str, Any]:
    """The response is OpenAI's error envelope with this status (and param / code when given).

    `param` may be a tuple of acceptable values or a string ending in '*' (a prefix: e.g. any path
    inside `messages`). `...` means "not checked".
    """
    assert response.status_code < 500, f"server error {response.status_code}: {response.text[:1000]}"
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:1000]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers.get("content-type")
    body = response.json()
    assert_matches(body, "ErrorResponse")
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["message"], error
    if param is not ...:
        assert param_matches(param, error["param"]), f"param: expected {param!r}, got {error['param']!r} ({error['message']})"
    if code is not ...:
        assert error["code"] == code, f"code: expected {code!r}, got {error['code']!r} ({error['message']})"
    if message_contains is not None:
        assert message_contains in error["message"], error["message"]
    return error


def param_matches(expected: Any, got: Any) -> bool:
    if isinstance(expected, tuple):
        return any(param_matches(option, got) for option in expected)
    if isinstance(expected, str) and expected.endswith("*"):
        return isinstance(got, str) and got.startswith(expected[:-1])
    return expected == got


__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "DEFAULT_MODEL",
    "RESPONSES_PATH",
    "NamedEvent",
    "ResponseChecker",
    "SSEStream",
    "StreamedChoice",
    "assert_error",
    "assert_matches",
    "check_schema",
    "completion_chunk_schema",
    "completion_response_schema",
    "make_client",
    "make_async_openai",
    "make_openai",
    "openapi_schema",
    "param_matches",
    "parse_named_sse",
    "parse_sse",
    "stream_post",
    "summarize_stream",
]
