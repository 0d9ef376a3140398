"""The engine's async front. LLMEngine is not thread-safe and its step() blocks for tens of milliseconds,
so one engine thread owns it: it loads the model, applies add/abort commands between steps, runs step(),
and hands each step's outputs to the event loop in one call_soon_threadsafe. Each request reads its
outputs from its own asyncio.Queue, so the event loop never waits on the engine."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hotcold.engine.errors import HotcoldError

log = logging.getLogger("hotcold.server")


class QueueFull(Exception):
    """More requests than --max-num-seqs + --max-queue are in flight."""


class NotAccepting(Exception):
    """The engine is loading, draining (SIGTERM) or dead."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False


@dataclass
class Backend:
    """What the build function returns: the engine and what the server needs beside it."""

    engine: Any  # hotcold.engine.llm.LLMEngine
    tokenizer: Any
    vocab_size: int = 0
    generation_defaults: Any = None


@dataclass
class AbortedOutput:
    """What a request's reader gets when the server cuts it (shutdown grace period over)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    logprobs: list[Any] | None = None
    finished: bool = True
    finish_reason: str = "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Group:
    """The engine requests of one HTTP request (n choices x prompts), read as one stream of outputs."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self.engine, self.request_ids = engine, request_ids
        self.queue: asyncio.Queue = asyncio.Queue()

    async def outputs(self) -> AsyncIterator[Any]:
        """Yield RequestOutputs until every request finished; abort the rest if the reader goes away."""
        remaining = len(self.request_ids)
        try:
            while remaining:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    remaining -= 1
        finally:
            self.abort()

    def abort(self) -> None:
        for rid in self.request_ids:
            self.engine.abort(rid)


@dataclass
class EngineStats:
    """The latest engine.stats(), refreshed by the engine thread after each step (read-only elsewhere)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    ffn_sparsity: float | None = None
    hot_share: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AsyncEngine:
    """Runs `build()` (which loads the model and returns an LLMEngine) on a dedicated thread and serves
    generate() streams to coroutines. `metrics` (server.metrics.ServerMetrics or None) is fed from here."""

    def __init__(self, build: Callable[[], Backend], max_in_flight: int, metrics: Any = None):
        self._build = build
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.engine: Any = None
        self.backend: Backend | None = None
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.stats = EngineStats()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._live: set[str] = set()  # request ids inside the engine (engine thread only)
        self.on_load_failed: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------ lifecycle (event loop side)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._thread_main, name="hotcold-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    # ------------------------------------------------------------------------------ request side
    def check_accepting(self) -> None:
        """NotAccepting while the model loads or the server drains."""
        if not self.ready or self.draining:
            raise NotAccepting("the server is shutting down" if self.draining else "the model is loading")

    def check_capacity(self, num_seqs: int) -> None:
        """Raise before any work is queued, so a full server answers 429 at once."""
        self.check_accepting()
        if len(self._streams) + num_seqs > self.max_in_flight:
            raise QueueFull(f"the server is at capacity ({self.max_in_flight} sequences in flight or queued)")

    async def submit(self, requests: list[tuple[str, list[int], Any]]) -> Group:
        """Add (request_id, prompt_ids, params) requests as one group; raises HotcoldError (a client error)
        if the engine refuses any of them, after aborting the others."""
        assert self._loop is not None
        self.check_capacity(len(requests))  # again: other requests may have come in while we tokenized
        group = Group(self, [rid for rid, _, _ in requests])
        futs = []
        for rid, ids, params in requests:
            self._streams[rid] = _Stream(group.queue, time.perf_counter())
            fut = self._loop.create_future()
            self._cmds.put(("add", (rid, ids, params), fut))
            futs.append(fut)
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        except BaseException:  # cancelled (client gone): the adds still land, so abort them
            group.abort()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            group.abort()
            raise errors[0]
        return group

    def abort(self, request_id: str) -> None:
        """Safe to call from anywhere on the loop, even in a finally during cancellation."""
        s = self._streams.pop(request_id, None)
        if s is not None and not s.finished:
            s.finished = True
            self._cmds.put(("abort", request_id, None))
            if self.metrics is not None:
                self.metrics.aborted.inc()

    def abort_all(self) -> int:
        """End every request in flight with finish_reason "abort" (their readers finish cleanly)."""
        n = 0
        for rid, s in list(self._streams.items()):
            if not s.finished:
                s.queue.put_nowait(AbortedOutput(rid))
                self.abort(rid)
                n += 1
        return n

    async def run_in_engine(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (the model is not thread-safe)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._cmds.put(("call", fn, fut))
        return await fut

    # ------------------------------------------------------------------------------ engine thread
    def _resolve(self, fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
        def set_it() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._loop.call_soon_threadsafe(set_it)

    def _thread_main(self) -> None:
        try:
            self.backend = self._build()
            self.engine = self.backend.engine
        except BaseException as exc:  # reported by the caller; the server exits
            self.load_error = exc
            log.error("loading the model failed: %s", exc)
            if self.on_load_failed is not None:
                self._loop.call_soon_threadsafe(self.on_load_failed, exc)
            return
        self._refresh_stats()
        self.ready = True
        log.info("model loaded; engine ready (max_model_len=%d)", self.engine.max_model_len)
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._apply_commands(block=not busy)
            if self._stop.is_set():
                break
            if not self.engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # an engine bug: fail the requests in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._loop.call_soon_threadsafe(self._fail_all, exc)
                self._abort_all_in_engine()
                continue
            if self.metrics is not None:
                self.metrics.observe_step(time.perf_counter() - t0)
            self._refresh_stats()
            for out in outputs:
                if out.finished:
                    self._live.discard(out.request_id)
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs, time.perf_counter())
        self._abort_all_in_engine()

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        changed = False
        while True:
            kind, arg, fut = cmd
            if kind == "add":
                try:
                    self.engine.add_request(*arg)
                    self._live.add(arg[0])
                    self._resolve(fut, None)
                except Exception as exc:
                    err = exc if isinstance(exc, HotcoldError) else HotcoldError(
                        f"{type(exc).__name__}: {exc}")
                    self._resolve(fut, error=err)
                changed = True
            elif kind == "abort":
                if arg in self._live:
                    self._live.discard(arg)
                    self.engine.abort(arg)
                changed = True
            elif kind == "call":
                try:
                    self._resolve(fut, arg(self.engine))
                except Exception as exc:
                    self._resolve(fut, error=exc)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
        if changed:
            self._refresh_stats()

    def _abort_all_in_engine(self) -> None:
        for rid in list(self._live):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
        self._live.clear()

    def _refresh_stats(self) -> None:
        try:
            st = dict(self.engine.stats())
        except Exception:  # stats are best effort; never take the engine down for them
            return
        sparsity = st.pop("ffn_sparsity", None)
        self.stats = EngineStats(
            num_running=int(st.pop("num_running", 0)),
            num_waiting=int(st.pop("num_waiting", 0)),
            kv_cache_usage=float(st.pop("kv_cache_usage", 0.0) or 0.0),
            ffn_sparsity=sparsity,
            hot_share=st.pop("hot_share", None),
            extra=st,
        )
        if self.metrics is not None:
            self.metrics.set_engine_stats(self.stats)

    # ------------------------------------------------------------------------- loop-side callbacks
    def _dispatch(self, outputs: list[Any], t_engine: float) -> None:
        now = time.perf_counter()
        m = self.metrics
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:  # aborted meanwhile
                continue
            n_new = len(out.new_token_ids)
            if m is not None and n_new:
                if s.first_token_at is None:
                    m.observe_first_token(now - s.arrival, out.num_prompt_tokens)
                    if n_new > 1:
                        m.observe_inter_token(0.0, n_new - 1)
                else:
                    m.observe_inter_token((now - s.last_token_at) / n_new, n_new)
                m.add_generation_tokens(n_new)
            if n_new:
                s.first_token_at = s.first_token_at or now
                s.last_token_at = now
            if out.finished:
                s.finished = True
                del self._streams[out.request_id]
                if m is not None:
                    m.observe_finished(now - s.arrival, out.finish_reason)
            error = getattr(out, "error", None)
            s.queue.put_nowait(RuntimeError(error) if error else out)  # a failure of this request alone

    def _fail_all(self, exc: BaseException) -> None:
        for s in self._streams.values():
            s.finished = True
            s.queue.put_nowait(RuntimeError(f"engine failure: {exc}"))
        self._streams.clear()
