"""Slow clients against a real `heron serve` with short timeouts: a connection dripping its headers,
one sending its body too slowly, an idle keep-alive connection and a crowd of silent connections are
all closed in time, while a normal client is served throughout.
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest
from server_helpers import DEFAULT_MODEL, start_server, stop_server

HEADER_S, BODY_S, IDLE_S = 1.0, 1.5, 1.0
MARGIN_S = 2.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    srv = start_server(
        "slow-clients",
        tmp_path_factory.mktemp("heron-slow"),
        [
            "--max-model-len", "512",
            "--header-timeout", str(HEADER_S),
            "--body-timeout", str(BODY_S),
            "--keep-alive-timeout", str(IDLE_S),
        ],
        env={},
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long after the call that was."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit_s} s; got {data!r}")
    return data, time.monotonic() - start


def test_header_drip_is_cut_off(slow_server):
    sock = _connect(slow_server)
    start = time.monotonic()
    request = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * 200}\r\n".encode()
    closed_after = None
    for byte in request:  # one byte every 0.1 s: 20 s for the whole request
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - start
            break
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                got = sock.recv(1024)
            except ConnectionResetError:
                got = b""
            assert got == b"", got
            closed_after = time.monotonic() - start
            break
    sock.close()
    assert closed_after is not None, "the server never closed a connection dripping its headers"
    assert HEADER_S * 0.8 <= closed_after <= HEADER_S + MARGIN_S


def test_slow_body_gets_408(slow_server):
    sock = _connect(slow_server)
    body = json.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:10].encode())  # and the rest never comes
    data, elapsed = _read_until_closed(sock, BODY_S + MARGIN_S)
    sock.close()
    assert elapsed >= BODY_S * 0.8
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), data
    payload = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert payload["error"]["code"] == "request_timeout" and payload["error"]["message"]


def test_idle_keep_alive_connection_is_closed(slow_server):
    sock = _connect(slow_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data, elapsed = _read_until_closed(sock, IDLE_S + MARGIN_S)
    sock.close()
    assert data.startswith(b"HTTP/1.1 200"), data
    assert elapsed >= IDLE_S * 0.8


def test_many_slow_connections_are_closed_while_others_are_served(slow_server):
    sockets = [_connect(slow_server) for _ in range(50)]
    for i, sock in enumerate(sockets):
        if i % 2:  # half send a partial request, half nothing at all
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    with httpx.Client(base_url=slow_server.base_url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        chat = client.post(
            "/v1/chat/completions",
            json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code == 200, chat.text
        open_ = set(sockets)
        while open_ and time.monotonic() - start < HEADER_S + MARGIN_S + 2:
            readable, _, _ = select.select(list(open_), [], [], 0.2)
            for sock in readable:
                try:
                    got = sock.recv(1024)
                except ConnectionResetError:
                    got = b""
                assert got == b"", got
                open_.discard(sock)
        assert client.get("/health").status_code == 200
    for sock in sockets:
        sock.close()
    assert not open_, f"{len(open_)} of 50 slow connections still open"
