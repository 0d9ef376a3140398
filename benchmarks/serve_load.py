"""Serving throughput and latency at several concurrencies: starts `hotcold serve` on 127.0.0.1, runs
`hotcold loadtest` against it at each concurrency, prints one table and writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py [--model default] [--plan PLAN_DIR] [--concurrency 1,4,16]
        [--num-prompts 32] [--input-len 128] [--output-len 64]
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
            raise SystemExit(f"hotcold serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("hotcold serve did not become ready in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--plan", default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hotcold.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs)]
    if args.plan:
        cmd += ["--plan", args.plan]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    rows = []
    try:
        wait_ready(url, server)
        for c in [int(v) for v in args.concurrency.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                result_file = Path(tmp) / "result.json"
                num = max(args.num_prompts, 2 * c)
                run = subprocess.run(
                    [sys.executable, "-m", "hotcold.cli", "loadtest", "--base-url", url, "--num-prompts", str(num),
                     "--max-concurrency", str(c), "--request-rate", "inf", "--input-len", str(args.input_len),
                     "--output-len", str(args.output_len), "--ignore-eos", "--no-progress", "--seed", "0",
                     "--save-result", str(result_file)], capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"loadtest failed at concurrency {c}: {run.stderr.strip()}")
                summary = json.loads(result_file.read_text())["summary"]
            rows.append({"concurrency": c, **summary})
    finally:
        server.terminate()
        server.wait(timeout=60)

    base = rows[0]["output_throughput"]
    print(f"\nmodel {args.model}{' plan ' + args.plan if args.plan else ''}: input {args.input_len} tokens, "
          f"output {args.output_len} tokens, request rate inf")
    print(f"{'conc':>4s} {'ok':>4s} {'fail':>4s} {'out tok/s':>10s} {'vs c=1':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'TPOT p50':>9s} {'TPOT p99':>9s}  (ms)")
    for r in rows:
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        print(f"{r['concurrency']:4d} {r['successful_requests']:4d} {r['failed_requests']:4d} "
              f"{r['output_throughput']:10.1f} {r['output_throughput'] / base:6.2f}x {ttft['median']:9.0f} "
              f"{ttft['p99']:9.0f} {tpot['median']:9.1f} {tpot['p99']:9.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
