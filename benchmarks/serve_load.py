"""Serving throughput and latency at several concurrencies, hotcold against llama.cpp's llama-server on the
same GGUF and thread count: starts both on 127.0.0.1, runs `hotcold loadtest` against each in turn at every
concurrency (A/B, one client for both), with fresh prompts in every run (llama-server reuses the KV of
prompts it has seen), prints one table and writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py [--model default] [--plan PLAN_DIR] [--concurrency 1,4,16]
        [--num-prompts 32] [--input-len 128] [--output-len 64] [--threads 2] [--no-llama]
    python benchmarks/serve_load.py --workload chat [--concurrency 4] [--turns 4]

`--workload chat` runs multi-turn conversations instead (benchmarks/chat_workload.py: each turn resends the
history), against hotcold with its prefix cache, hotcold with --no-prefix-caching, and llama-server (which
reuses a slot's prompt prefix), and reports time to first token of first and of later turns.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{proc.args[0]} did not become ready in time")


def load(url: str, c: int, seed: int, args: argparse.Namespace) -> dict:
    """One loadtest run at concurrency c; the summary."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        num = max(args.num_prompts, 2 * c)
        run = subprocess.run(
            [sys.executable, "-m", "hotcold.cli", "loadtest", "--base-url", url, "--num-prompts", str(num),
             "--max-concurrency", str(c), "--request-rate", "inf", "--input-len", str(args.input_len),
             "--output-len", str(args.output_len), "--ignore-eos", "--no-progress", "--seed", str(seed),
             "--tokenizer", args.model, "--save-result", str(result_file)], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"loadtest failed at concurrency {c} against {url}: {run.stderr.strip()}")
        return json.loads(result_file.read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--plan", default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server")
    ap.add_argument("--workload", default="random", choices=["random", "chat"])
    ap.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()

    from hotcold.engine.loader import resolve_model_path

    sys.path.insert(0, str(Path(__file__).parent))
    from decode_cpu import cpu_line

    concurrencies = [int(v) for v in args.concurrency.split(",")]
    servers = {}
    port = free_port()
    cmd = [sys.executable, "-m", "hotcold.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads)]
    if args.plan:
        cmd += ["--plan", args.plan]
    servers["hotcold"] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           env=os.environ.copy()), f"http://127.0.0.1:{port}")
    if args.workload == "chat":
        port = free_port()
        nocache = [*cmd[:cmd.index("--port") + 1], str(port), *cmd[cmd.index("--port") + 2:], "--no-prefix-caching"]
        servers["hotcold-nocache"] = (subprocess.Popen(nocache, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                       env=os.environ.copy()), f"http://127.0.0.1:{port}")
    path = resolve_model_path(args.model)
    if not args.no_llama and path.suffix == ".gguf":
        from peer import tool

        port = free_port()
        ctx = max(concurrencies) * (4096 if args.workload == "chat" else args.input_len + args.output_len + 64)
        servers["llama-server"] = (subprocess.Popen(
            [tool("llama-server"), "-m", str(path), "--port", str(port), "-t", str(args.threads), "-np",
             str(max(concurrencies)), "-cb", "-c", str(ctx)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            f"http://127.0.0.1:{port}")
    rows = []
    try:
        for proc, url in servers.values():
            wait_ready(url, proc)
        seed = 1000 * int(time.time()) % 1_000_000_000  # prompts no server has seen: fresh in every run
        for c in concurrencies:
            for name, (_, url) in servers.items():  # A/B at each concurrency
                seed += 1
                if args.workload == "chat":
                    from chat_workload import chat_load

                    rows.append({"server": name, "concurrency": c,
                                 **chat_load(url, str(args.model), seed, conversations=c, turns=args.turns)})
                else:
                    rows.append({"server": name, "concurrency": c, **load(url, c, seed, args)})
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

    peer = {r["concurrency"]: r["output_throughput"] for r in rows if r["server"] == "llama-server"}
    print(f"\n{cpu_line()}")
    if args.workload == "chat":
        print_chat(rows, peer, args)
        write(rows, args, cpu_line())
        return
    print(f"model {args.model}{' plan ' + args.plan if args.plan else ''}: input {args.input_len} tokens, "
          f"output {args.output_len} tokens, request rate inf, {args.threads} threads")
    print(f"{'server':12s} {'conc':>4s} {'ok':>4s} {'fail':>4s} {'out tok/s':>10s} {'vs peer':>7s} {'TTFT p50':>9s} "
          f"{'TTFT p99':>9s} {'TPOT p50':>9s} {'TPOT p99':>9s}  (ms)")
    for r in rows:
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        ratio = f"{r['output_throughput'] / peer[r['concurrency']]:6.2f}x" if r["concurrency"] in peer else "      -"
        print(f"{r['server']:12s} {r['concurrency']:4d} {r['successful_requests']:4d} {r['failed_requests']:4d} "
              f"{r['output_throughput']:10.1f} {ratio} {ttft['median']:9.0f} "
              f"{ttft['p99']:9.0f} {tpot['median']:9.1f} {tpot['p99']:9.1f}")
    write(rows, args, cpu_line())


def print_chat(rows: list[dict], peer: dict, args: argparse.Namespace) -> None:
    print(f"model {args.model}: multi-turn chat, {args.turns} turns per conversation, each resending the history "
          f"(~450-token system prompt, 48 tokens out per turn), {args.threads} threads")
    print(f"{'server':16s} {'convs':>5s} {'reqs':>4s} {'out tok/s':>10s} {'vs peer':>7s} {'TTFT turn 1 p50':>16s} "
          f"{'p99':>7s} {'TTFT turns 2+ p50':>18s} {'p99':>7s}  (ms)")
    for r in rows:
        ratio = f"{r['output_throughput'] / peer[r['concurrency']]:6.2f}x" if r["concurrency"] in peer else "      -"
        a, b = r["ttft_first_turn_ms"], r["ttft_later_turns_ms"]
        print(f"{r['server']:16s} {r['concurrency']:5d} {r['requests']:4d} {r['output_throughput']:10.1f} {ratio} "
              f"{a['median']:16.0f} {a['p99']:7.0f} {b['median']:18.0f} {b['p99']:7.0f}"
              + (f"  ({r['retries']} retried)" if r["retries"] else ""))


def write(rows: list[dict], args: argparse.Namespace, machine: str) -> None:
    out = Path(args.out if args.workload == "random" else args.out.replace(".json", "_chat.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows,
                               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
