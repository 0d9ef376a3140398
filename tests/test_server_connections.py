"""`hotcold serve` against slow and idle clients, and in its OpenAPI schema, as a real process: half-sent
headers and bodies (slowloris) neither delay a normal request nor outlive --read-timeout, connections beyond
--max-connections get 503, and /openapi.json documents the 400/503 envelopes and text/plain metrics that the
server sends. (SIGTERM: test_server_lifecycle.py.)"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from live_server import ServerProcess
from tiny_models import make_tiny_checkpoint

READ_TIMEOUT = 3.0
MAX_CONNECTIONS = 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("conn") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_path: Path):
    srv = ServerProcess("--model", str(tiny_path), "--read-timeout", str(READ_TIMEOUT),
                        "--max-connections", str(MAX_CONNECTIONS))
    srv.wait_ready()
    _complete(srv.url, max_tokens=4).raise_for_status()  # warm: first-request costs are not what is timed
    yield srv
    assert srv.stop() == 0, srv.output()
    assert "Traceback" not in srv.output(), srv.output()


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def _is_open(sock: socket.socket) -> bool:
    """True if the server has neither closed the socket nor answered on it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def _read_to_close(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # a close with unread request bytes may be a reset: closed all the same
    return data


def _complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "temperature": 0, **body}, timeout=30)


def test_half_open_connections_are_closed_and_do_not_delay_others(server: ServerProcess):
    header_only, partial_body = [], []
    t0 = time.monotonic()
    for i in range(50):
        s = _connect(server.url)
        if i % 5 == 0:  # a whole header, then 20 of the 200 body bytes it announced
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 200\r\n\r\n{\"prompt\": \"Hello wo")
            partial_body.append(s)
        else:  # half a header
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            header_only.append(s)
    # a normal request meanwhile is served at once, not after the stalled ones
    start = time.monotonic()
    r = _complete(server.url, max_tokens=4, ignore_eos=True)
    took = time.monotonic() - start
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    assert took < READ_TIMEOUT / 2, f"a normal request took {took:.2f}s next to 50 stalled connections"
    # all stalled connections are still held just before the timeout ...
    time.sleep(max(t0 + READ_TIMEOUT - 0.7 - time.monotonic(), 0))
    assert all(_is_open(s) for s in header_only + partial_body)
    # ... and closed by the server soon after it: silently for a half header, with 408 for a stalled body
    deadline = t0 + READ_TIMEOUT + 3
    for s in header_only:
        assert _read_to_close(s, deadline) == b""
        assert time.monotonic() < deadline, "a half-header connection outlived --read-timeout"
    for s in partial_body:
        head, _, body = _read_to_close(s, deadline).partition(b"\r\n\r\n")
        assert time.monotonic() < deadline, "a stalled-body connection outlived --read-timeout"
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and set(err) == {"message", "type", "param", "code"}
    for s in header_only + partial_body:
        s.close()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_connections_over_the_cap_get_503(server: ServerProcess):
    time.sleep(0.3)  # earlier tests' connections are gone from the server's count
    idle = [_connect(server.url) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has accepted all of them
        r = httpx.get(f"{server.url}/v1/models", timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert "too many connections" in r.json()["error"]["message"]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while (status := httpx.get(f"{server.url}/v1/models", timeout=10).status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_openapi_documents_what_the_server_sends(server: ServerProcess):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    paths, components = schema["paths"], schema["components"]["schemas"]
    responses = {(p, m): op["responses"] for p, ops in paths.items() for m, op in ops.items()}
    assert not [k for k, r in responses.items() if "422" in r], "FastAPI's 422 is never sent"
    assert "HTTPValidationError" not in components
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        for status in ("400", "401", "404", "429", "503"):
            assert responses[(path, "post")][status]["content"]["application/json"]["schema"] == envelope
    info = components[components["ErrorResponse"]["properties"]["error"]["$ref"].split("/")[-1]]
    assert set(info["properties"]) == {"message", "type", "param", "code"}
    assert list(responses[("/metrics", "get")]["200"]["content"]) == ["text/plain"]
    # and the server does what it documents
    assert httpx.get(f"{server.url}/metrics", timeout=10).headers["content-type"].startswith("text/plain")
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": "many"}, timeout=10)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
