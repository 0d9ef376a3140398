"""A fake OpenAI-compatible streaming server on 127.0.0.1 that fails, stalls and drops requests on cue, and
`hotcold loadtest` run in-process against a server, for the load-test client's tests."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hotcold.cli import main as cli_main


def run_loadtest(base_url: str, out_dir: Path, *args: str) -> tuple[int, dict | None]:
    """Run `hotcold loadtest` in-process against `base_url`; (exit code, saved JSON or None)."""
    out = out_dir / "loadtest.json"
    out.unlink(missing_ok=True)
    rc = cli_main(["loadtest", "--base-url", base_url, "--no-progress", "--save-result", str(out), *args])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


class FakeServer:
    """FastAPI + uvicorn on 127.0.0.1 in a thread. `plan(n)` decides what the n-th request (0 = first)
    gets: "ok", "fail" (HTTP 503), "stall" (headers, then silence), "drop" (closes mid-stream). /metrics
    answers an empty exposition, the second and later reads after `slow_metrics` seconds; with a `tokenizer`,
    /tokenize and /detokenize answer as vLLM's do."""

    def __init__(self, plan: Callable[[int], str], usage: bool = True, first_delay: float = 0.05,
                 gap: float = 0.01, words_per_chunk: int = 1, slow_metrics: float = 0.0, tokenizer: Any = None):
        self.plan, self.usage, self.first_delay, self.gap = plan, usage, first_delay, gap
        self.words_per_chunk = words_per_chunk
        self.bodies: list[dict] = []
        self.root: str | None = None
        self.in_flight = self.peak = 0
        app = FastAPI()
        self.slow_metrics, self.metrics_reads = slow_metrics, 0
        app.get("/v1/models")(self.models)
        app.get("/metrics")(self.metrics)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            app.post("/tokenize")(self.tokenize)
            app.post("/detokenize")(self.detokenize)
        app.post("/v1/completions")(self.complete)
        app.post("/v1/chat/completions")(self.complete)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    async def tokenize(self, request: Request):  # vLLM's routes, with `tokenizer` (a tokenizers.Tokenizer)
        body = await request.json()
        return {"tokens": self.tokenizer.encode(body["prompt"]).ids}

    async def detokenize(self, request: Request):
        return {"prompt": self.tokenizer.decode((await request.json())["tokens"], skip_special_tokens=False)}

    async def metrics(self):
        self.metrics_reads += 1
        if self.metrics_reads > 1:
            await asyncio.sleep(self.slow_metrics)
        return PlainTextResponse("")

    async def models(self):
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "root": self.root}]}

    async def complete(self, request: Request):
        body = await request.json()
        n = len(self.bodies)
        self.bodies.append(body)
        behaviour = self.plan(n)
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "queue full", "type": "server_error", "param": None,
                                           "code": 503}}, status_code=503)
        chat = "messages" in body

        async def events():
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(60 if behaviour == "stall" else self.first_delay)
                for i in range(body["max_tokens"]):
                    if behaviour == "drop" and i == 2:
                        raise RuntimeError("dropped on purpose")
                    piece = " tok" * self.words_per_chunk
                    choice = {"index": 0, "delta": {"content": piece}} if chat else {"text": piece}
                    yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
                    await asyncio.sleep(self.gap)
                if self.usage and (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 7,
                             "completion_tokens": body["max_tokens"] * self.words_per_chunk}
                    yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.025)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
