"""The load test's client: streaming requests timed as vLLM's `bench serve` times them, sent on the drawn
arrival schedule under a concurrency cap, each bounded by its timeout and all by an overall deadline, and a
Ctrl-C that never loses what was measured."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from hotcold.engine.errors import HotcoldError
from hotcold.server.loadtest_data import Prompt
from hotcold.server.loadtest_stats import BenchmarkRun, RequestRecord


@dataclass
class ClientConfig:
    url: str
    chat: bool
    model: str
    timeout: float
    max_duration: float
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    progress: bool = True
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self, prompt: Prompt) -> dict:
        body: dict = {"model": self.model, "max_tokens": prompt.max_tokens, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        else:
            body["prompt"] = prompt.text
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


class _Failed(Exception):
    """A request that the server answered badly; the message goes into the record."""


def _error_message(body: bytes) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:300] or "(empty body)"


async def _stream(client: httpx.AsyncClient, cfg: ClientConfig, payload: dict, rec: RequestRecord,
                  start: float) -> None:
    async with client.stream("POST", cfg.url, json=payload, headers=cfg.headers) as resp:
        if resp.status_code != 200:
            raise _Failed(f"HTTP {resp.status_code}: {_error_message(await resp.aread())}")
        parts: list[str] = []
        last = None
        chunks, usage, done = 0, None, False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                raise _Failed(f"bad SSE chunk: {data[:80]!r}") from None
            if "error" in obj:
                raise _Failed(f"error in stream: {_error_message(json.dumps(obj).encode())}")
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                if cfg.chat:
                    delta = choice.get("delta") or {}
                    piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                else:
                    piece = choice.get("text") or ""
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
                    parts.append(piece)
        if not done:
            raise _Failed("stream ended before [DONE]")
        rec.generated_text = "".join(parts)
        if usage and isinstance(usage.get("completion_tokens"), int):
            rec.output_tokens, rec.output_tokens_source = usage["completion_tokens"], "usage"
            rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))
        else:
            rec.output_tokens, rec.output_tokens_source = chunks, "chunks"


async def send_one(client: httpx.AsyncClient, cfg: ClientConfig, prompt: Prompt, rec: RequestRecord,
                   t0: float) -> RequestRecord:
    """Send one streaming request, filling `rec`; never raises except on cancellation."""
    start = time.perf_counter()
    rec.sent, rec.sent_at, rec.error, rec.success = True, start - t0, "", False
    try:
        await asyncio.wait_for(_stream(client, cfg, cfg.payload(prompt), rec, start), cfg.timeout)
        rec.success = True
    except asyncio.TimeoutError:
        rec.error = f"timeout: no complete response within {cfg.timeout:g} s"
    except asyncio.CancelledError:
        rec.error = "cancelled"  # benchmark() says why
        raise
    except _Failed as exc:
        rec.error = str(exc)
    except Exception as exc:  # connection refused, reset, protocol errors: counted, never fatal
        rec.error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    finally:
        end = time.perf_counter()
        rec.latency, rec.finished_at = end - start, end - t0
    return rec


def _client(cfg: ClientConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), limits=limits)


async def benchmark(cfg: ClientConfig, prompts: list[Prompt], gaps: np.ndarray,
                    measured: Callable[[], None] = lambda: None) -> BenchmarkRun:
    """The first prompt as a test request (HotcoldError if it fails), then the timed run. Cancelling this task
    during the run (CtrlC does, on Ctrl-C) stops sending and cancels what is in flight, keeping what finished;
    `measured()` is called when the timed part is over, before the cleanup (which must not be cancelled)."""
    records = [RequestRecord(index=i, prompt_tokens=p.prompt_tokens, max_tokens=p.max_tokens)
               for i, p in enumerate(prompts)]
    async with _client(cfg) as client:
        first = prompts[0]
        probe = RequestRecord(index=-1, prompt_tokens=first.prompt_tokens, max_tokens=first.max_tokens)
        await send_one(client, cfg, prompts[0], probe, time.perf_counter())
        if not probe.success:
            raise HotcoldError(
                f"the first test request to {cfg.url} failed ({probe.error}); nothing was measured")
        print(f"test request ok ({probe.latency:.2f} s); starting the benchmark", flush=True)

        from tqdm import tqdm

        bar = tqdm(total=len(prompts), disable=not cfg.progress, unit="req", file=sys.stderr)
        semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(prompt: Prompt, rec: RequestRecord) -> None:
            if semaphore is None:
                await send_one(client, cfg, prompt, rec, t0)
            else:
                async with semaphore:
                    await send_one(client, cfg, prompt, rec, t0)
            bar.update(1)

        t0 = time.perf_counter()
        deadline = t0 + cfg.max_duration
        due = t0 + np.cumsum(gaps)
        tasks: list[asyncio.Task] = []
        why, interrupted = "the overall deadline (--max-duration) was reached", False
        try:
            for prompt, rec, when in zip(prompts, records, due, strict=True):
                if when >= deadline:
                    break
                if when > time.perf_counter():
                    await asyncio.sleep(when - time.perf_counter())
                tasks.append(asyncio.create_task(limited(prompt, rec)))
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        except asyncio.CancelledError:
            why, interrupted = "interrupted (Ctrl-C)", True
        measured()
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        bar.close()
    for rec in records:  # never sent (past the deadline, or waiting for a slot), or cancelled in flight
        if not rec.sent:
            rec.error = f"not sent: {why}"
        elif rec.error == "cancelled":
            rec.error = f"cancelled: {why}"
    return BenchmarkRun(records, duration, interrupted)


class ServerTokenizer:
    """The served model's tokenizer through the server's own /tokenize and /detokenize (hotcold's and vLLM's),
    for exact prompt lengths on a machine that does not have the model. `decode` drops the special tokens the
    server adds to any text (BOS), as a local tokenizer's decode skips them."""

    def __init__(self, client: httpx.Client, model: str):
        self._client, self._model = client, model
        self._added = set(self.encode(""))

    @classmethod
    def probe(cls, base: str, model: str, headers: dict[str, str], timeout: float) -> tuple[Any, str]:
        """(a ServerTokenizer, "") if the server tokenizes and round-trips a text, else (None, why not)."""
        client = httpx.Client(base_url=base, headers=headers, timeout=timeout)
        try:
            tok = cls(client, model)
            if "hello world" in tok.decode(tok.encode("hello world")):
                return tok, ""
            why = "the server's /tokenize does not round-trip a text"
        except Exception as exc:  # no such route (llama-server's takes other fields), or no server
            why = f"the server has no vLLM-style /tokenize ({type(exc).__name__}: {exc})".splitlines()[0]
        client.close()
        return None, why

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, body: dict) -> Any:
        r = self._client.post(path, json={"model": self._model, **body})
        if r.status_code != 200:
            raise HotcoldError(f"the server's {path} answered HTTP {r.status_code}: {_error_message(r.content)}")
        return r.json()

    def encode(self, text: str) -> list[int]:
        tokens = self._post("/tokenize", {"prompt": text})["tokens"]
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise HotcoldError("the server's /tokenize answered no list of token ids")
        return tokens

    def decode(self, ids: list[int]) -> str:
        return str(self._post("/detokenize", {"tokens": [t for t in ids if t not in self._added]})["prompt"])


class CtrlC:
    """SIGINT while a load test runs and reports. During the timed run the first Ctrl-C cancels it (benchmark
    keeps what finished) and later ones wait for that; inside `skippable()` a Ctrl-C skips that step; at any
    other time it is ignored until the result is printed and saved. Before the timed run began nothing was
    measured: the command ends as interrupted."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pressed = False
        self._skippable = False
        self._cancellable = True  # until the one cancel is sent, or benchmark() says the timed part is over

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed = True
        if self._skippable:
            raise KeyboardInterrupt
        if self.loop is not None and self.task is not None and not self.task.done():  # (later, the loop is closed)
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        """On the loop's thread, so that it and benchmark's `measured()` cannot interleave."""
        if self._cancellable and self.task is not None and not self.task.done():
            self._cancellable = False
            self.task.cancel()

    def _measured(self) -> None:
        self._cancellable = False

    @contextmanager
    def installed(self) -> Iterator[CtrlC]:
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:  # once pressed, the command is ending: a later press must not turn into a traceback at exit
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.pressed else previous)

    @contextmanager
    def skippable(self) -> Iterator[None]:
        self._skippable = True
        try:
            yield
        finally:
            self._skippable = False

    def run(self, cfg: ClientConfig, prompts: list[Prompt], gaps: np.ndarray) -> BenchmarkRun:
        """benchmark() on an event loop of its own, with this handler in place of asyncio's (whose second
        Ctrl-C raises wherever the loop happens to be)."""
        loop = self.loop = asyncio.new_event_loop()
        try:
            self.task = loop.create_task(benchmark(cfg, prompts, gaps, self._measured))
            try:
                return loop.run_until_complete(self.task)
            except asyncio.CancelledError:  # during the test request: nothing was measured
                raise KeyboardInterrupt from None
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
