"""A `hotcold serve` process on loopback for the server tests, and what they read from it: /metrics as a dict,
SSE payloads, and transformers' log-probabilities (the independent reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class ServerProcess:
    """`python -m hotcold.cli serve --port 0 ...`; the port is read from the line the server prints."""

    def __init__(self, *args: str, timeout: float = 120.0):
        dtype = [] if "--dtype" in args else ["--dtype", "float32"]  # exact comparisons with transformers
        if "--dtype" in args and args[args.index("--dtype") + 1] == "default":  # what a user gets: no --dtype
            i = args.index("--dtype")
            args = args[:i] + args[i + 2:]
        cmd = [sys.executable, "-m", "hotcold.cli", "serve", "--port", "0", *dtype, *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._port = threading.Event()
        self.url = ""
        self.model_path: Path | None = None  # set by whoever built the model, for references
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._port.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + self.output())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on http://" in line and not self._port.is_set():
                self.url = line.split("listening on ")[1].split()[0]
                self._port.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300.0) -> list[tuple[int, dict]]:
        """Poll /health until 200; returns every (status, body) seen on the way."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=30)
            except httpx.ConnectError:  # bound and announced, not yet accepting: ask again
                time.sleep(0.05)
                continue
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                return seen
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("server not ready in time:\n" + self.output())

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def api_test_server(folder: Path) -> Iterator[ServerProcess]:
    """For a module-scoped fixture: a server on a tiny random Llama with a 4096-token context (so that long
    generations outlast the client's actions), an API key, and small limits; checked to exit 0 cleanly."""
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", folder / "tiny", max_position_embeddings=4096)
    srv = ServerProcess("--model", str(path), "--served-model-name", "tiny", "--api-key", KEY,
                        "--max-num-seqs", "8", "--max-queue", "8", "--max-num-batched-tokens", "64")
    srv.model_path = path
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.output()
    assert "Traceback" not in srv.output(), srv.output()


def post(server: ServerProcess, path: str, body, **kw) -> httpx.Response:
    """POST `body` (an object, or raw text/bytes sent as they are) with the test key."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {**AUTH, "content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=data, headers=headers, timeout=120, **kw)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{label=value,...}': value}, with the model_name label left out of the key."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def sse_events(response: httpx.Response) -> list[str]:
    """The raw SSE payloads; checks every event is exactly `data: ...` followed by a blank line."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
    return [e[len("data: "):] for e in events]


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)
