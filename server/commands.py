"""`hotcold serve`: bind the port first (so a busy port is a one-line error), answer /health with 503
while the engine thread loads the model, then serve. SIGTERM stops admission: the socket keeps listening
so new requests get a clean 503 (/health too), while running requests finish within --grace-period; then
the listener closes and the process exits 0. Slow or idle connections are bounded (server/connections.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from hotcold.engine.commands_generate import (
    add_gpu_memory_argument,
    add_sparse_prefill_argument,
    add_weight_arguments,
)
from hotcold.engine.errors import HotcoldError

log = logging.getLogger("hotcold.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', a Hugging Face folder or a .gguf file")
    parser.add_argument("--plan", default=None,
                        help="hot/cold plan folder made by `hotcold profile`; 'auto': the plan cached for this "
                             "model, profiled once on first use (minutes; /health says 503 meanwhile)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: model's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens per engine step (a token at position p counts 1 + p / attention scale: its "
                             "attention reads p keys); prompts longer than this are prefilled in chunks")
    parser.add_argument("--max-step-seconds", type=float, default=0.25,
                        help="while other requests wait on a step, cap its prompt chunks so that it should take "
                             "no longer than this (judged from the steps measured so far); 0: no cap")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV cache size in tokens (default: max-num-seqs x max-model-len; memory is touched "
                             "only as it is used)")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block (page) in tokens, a power of 2")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV blocks of prompt prefixes seen before")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences that may wait beyond the running batch; more get 429")
    parser.add_argument("--api-key", default=os.environ.get("HOTCOLD_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $HOTCOLD_API_KEY)")
    parser.add_argument("--allowed-origins", nargs="+", default=["*"], metavar="ORIGIN",
                        help="origins a browser may call the API from (CORS; default: any, as vLLM and llama-server)")
    add_weight_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--sparsity", default=None, choices=["off", "oracle", "predictor", "input"],
                        help="with --plan: which neurons run, or input thresholds (default: what the plan "
                             "was made for)")
    add_sparse_prefill_argument(parser)
    parser.add_argument("--placement", default="hybrid", choices=["hybrid", "gpu", "cpu"],
                        help="with --plan: hot neurons on the GPU and cold on the CPU, or all on one side (no "
                             "GPU: all on the CPU)")
    add_gpu_memory_argument(parser)
    parser.add_argument("--activation", default=None,
                        choices=["swiglu", "reglu", "drelu", "geglu", "relu", "relu2", "gelu"],
                        help="override the FFN activation the config declares")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds running requests get to finish after SIGTERM")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send a whole request header, and that a request body may "
                             "stall between reads; then the connection is closed")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="open connections served at once; requests on more get 503")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _check_args(args: argparse.Namespace) -> None:
    from hotcold.engine.commands_generate import check_model_args

    check_model_args(args)  # before the port is bound, as the other flags
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise HotcoldError(f"--{name.replace('_', '-')} must be at least 1")
    if args.block_size < 1 or args.block_size & (args.block_size - 1):
        raise HotcoldError(f"--block-size must be a power of 2, not {args.block_size}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < args.block_size:
        raise HotcoldError("--kv-cache-tokens must hold at least one block")
    if args.max_step_seconds < 0:
        raise HotcoldError("--max-step-seconds must be 0 (no cap) or more")
    if args.max_queue < 0:
        raise HotcoldError("--max-queue must be 0 or more")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise HotcoldError("--max-model-len must be at least 2")
    if not 0 <= args.port <= 65535:
        raise HotcoldError(f"--port {args.port} is not a port number")
    if args.grace_period < 0:
        raise HotcoldError("--grace-period must be 0 or more")
    if args.read_timeout <= 0:
        raise HotcoldError("--read-timeout must be more than 0")
    if args.max_connections < 1:
        raise HotcoldError("--max-connections must be at least 1")
    if args.sparsity not in (None, "off") and args.plan is None:
        raise HotcoldError(f"--sparsity {args.sparsity} needs --plan PLAN_DIR")
    if args.gpu_memory is not None:
        if args.plan is None:
            raise HotcoldError("--gpu-memory places a plan's neurons: it needs --plan PLAN_DIR")
        from hotcold.engine.placement import parse_memory

        parse_memory(args.gpu_memory)  # a bad size fails now, not on the engine thread
    # a cheap early check (the loader checks fully on the engine thread, while /health says 503)
    if args.model != "default" and not Path(args.model).expanduser().exists():
        raise HotcoldError(f"model {args.model!r} not found (give a Hugging Face folder, a .gguf file, or 'default')")
    if args.plan not in (None, "auto") and not Path(args.plan).expanduser().is_dir():
        raise HotcoldError(f"plan folder {args.plan!r} not found")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # from now on a client that connects waits in the backlog, not refused, until uvicorn
    except OSError as exc:
        raise HotcoldError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def auto_plan(model: str, activation: str | None) -> Path:
    """The plan cached for `model` under HOTCOLD_CACHE/plans, made with `hotcold profile` defaults if missing."""
    import hashlib
    import shutil

    from hotcold.engine.default_model import cache_dir
    from hotcold.engine.loader import resolve_model_path
    from hotcold.profiler import commands as profile_command

    path = resolve_model_path(model)
    # (profile's defaults are part of the key: since `--sparsity auto` picks input sparsity for SwiGLU models,
    # a neuron plan cached before is not what the defaults make)
    key = hashlib.sha256(f"{path.resolve()}|{activation}|sparsity-auto".encode()).hexdigest()[:12]
    folder = cache_dir() / "plans" / f"{path.stem}-{key}"
    if (folder / "plan.json").exists():
        return folder
    log.warning("no cached plan for %s: profiling it once into %s (this takes minutes)", model, folder)
    parser = argparse.ArgumentParser()
    profile_command.add_arguments(parser)
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    argv = ["--model", str(path), "--out", str(work), "--quiet"] + (["--activation", activation] if activation else [])
    profile_command.run(parser.parse_args(argv))
    work.rename(folder)  # only a finished plan is ever found in the cache
    return folder


def build_backend(args: argparse.Namespace) -> Any:
    """Runs on the engine thread: load the model (and its plan), then make the engine."""
    from hotcold.engine.commands_generate import KVReserve, load_from_args
    from hotcold.engine.llm import LLMEngine
    from hotcold.server.async_engine import Backend

    if args.plan == "auto":
        args.plan = str(auto_plan(args.model, args.activation))
    kv = (KVReserve(1, args.kv_cache_tokens, "--kv-cache-tokens") if args.kv_cache_tokens else
          KVReserve(args.max_num_seqs, args.max_model_len, "--max-num-seqs or --max-model-len"))
    loaded = load_from_args(args, kv)  # with --plan: the hybrid executor (engine/hybrid.py)
    longest = loaded.config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > longest:  # not clamped in silence
        raise HotcoldError(f"--max-model-len {args.max_model_len}: this model's maximum context is {longest} tokens")
    from hotcold.kernels import calibrate

    log.info("kernels: %s", calibrate.current().summary())
    from hotcold.engine.loader import memory_report

    log.info("memory: %s", memory_report(loaded.model))
    engine = LLMEngine(loaded, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
                       block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                       max_step_seconds=args.max_step_seconds or None)
    log.info("KV cache: %d blocks of %d tokens (%.0f MB reserved), prefix caching %s", engine.cache.num_blocks,
             engine.cache.block_size, engine.cache.nbytes() / 1e6, "off" if args.no_prefix_caching else "on")
    return Backend(engine=engine, tokenizer=loaded.tokenizer,
                   vocab_size=int(loaded.config.vocab_size), generation_defaults=loaded.generation)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from hotcold.server.app import ServerConfig, create_app
    from hotcold.server.async_engine import AsyncEngine
    from hotcold.server.connections import ConnectionGuard, protocol_class
    from hotcold.server.metrics import ServerMetrics

    _check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = _bind(args.host, args.port)
    name = args.served_model_name or str(args.model)
    metrics = ServerMetrics(name)
    aengine = AsyncEngine(lambda: build_backend(args), max_in_flight=args.max_num_seqs + args.max_queue,
                          metrics=metrics)
    app = create_app(aengine, ServerConfig(model_name=name, api_key=args.api_key, model_root=str(args.model),
                                             allowed_origins=list(args.allowed_origins)),
                     metrics)
    # uvicorn's graceful-shutdown timeout is only a backstop: Server.drain has ended the requests by then
    config = uvicorn.Config(ConnectionGuard(app, aengine, args.read_timeout), log_level=args.log_level,
                            http=protocol_class(args.read_timeout, args.max_connections),
                            access_log=args.log_level == "debug", timeout_graceful_shutdown=5, lifespan="on")

    class Server(uvicorn.Server):
        drain_task: asyncio.Task | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = aengine.loop
            if aengine.draining or loop is None:  # a second signal, or one before start-up: stop now
                super().handle_exit(sig, frame)
                return
            aengine.draining = True  # /health and new requests get 503 at once; the socket stays open
            loop.call_soon_threadsafe(self.start_drain, sig)

        def start_drain(self, sig: int) -> None:
            self.drain_task = asyncio.get_running_loop().create_task(self.drain(sig))

        async def drain(self, sig: int) -> None:
            """Wait for the requests running at the signal, end those that outlast --grace-period (their
            streams close with finish_reason 'abort'), then let uvicorn close the listener and exit."""
            running = set(self.server_state.tasks)
            log.info("draining: %d request(s) running, up to %gs to finish; new requests get 503", len(running),
                     args.grace_period)
            if running:
                _, running = await asyncio.wait(running, timeout=args.grace_period)
            if running:
                if n := aengine.abort_all():
                    log.warning("grace period over: ended %d request(s) with finish_reason 'abort'", n)
                await asyncio.wait(running, timeout=5)
            super().handle_exit(sig, None)

    server = Server(config)
    aengine.on_load_failed = lambda exc: setattr(server, "should_exit", True)
    host, port = sock.getsockname()[:2]
    print(f"hotcold serve: listening on http://{host}:{port} (model {name!r} loading)", flush=True)
    # uvicorn re-raises the signal it caught after shutting down; a no-op handler makes SIGTERM exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if aengine.load_error is not None:
        err = aengine.load_error
        raise err if isinstance(err, HotcoldError | FileNotFoundError) else HotcoldError(
            f"loading the model failed: {type(err).__name__}: {err}")
    return 0
