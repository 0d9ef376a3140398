"""Prefill speed against prompt length: hotcold vs llama.cpp's llama-bench on the same GGUF and threads, and
attention's share of each prefill. A token at position p reads the weights once and p keys; so tokens/s
must fall as prompts grow, and how fast it falls is attention's cost. Attention's share of a prefill of L
tokens is estimated as 1 - (seconds per token at the shortest length) / (seconds per token at L).

    python benchmarks/long_prefill.py [--model default] [--lengths 512,1024,2048,4096] [--threads 2]
        [--no-llama]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model, resolve_model_path
from hotcold.engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import cpu_line  # noqa: E402


def hotcold_prefill(engine: LLMEngine, ids: list[int]) -> float:
    """tokens/s of one whole-prompt prefill (chunks of --max-num-batched-tokens, as the server runs it)."""
    engine.add_request("p", ids, SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(ids) / (time.perf_counter() - t0)


def llama_prefill(path: Path, threads: int, n: int) -> float:
    import subprocess

    from peer import tool

    out = subprocess.run([tool("llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(n), "-n", "0", "-r",
                          "1", "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/long_prefill.json")
    args = ap.parse_args()
    import torch

    from hotcold.kernels import native

    torch.set_num_threads(args.threads)
    native.set_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    loaded = load_model(args.model)
    engine = LLMEngine(loaded, max_num_seqs=1, max_model_len=max(lengths) + 8,
                       max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    vocab = loaded.config.vocab_size
    hotcold_prefill(engine, [(i * 7919) % (vocab - 10) + 5 for i in range(256)])  # warm-up
    rows = []
    for n in lengths:  # A/B at each length
        ids = [(i * 7919 + n) % (vocab - 10) + 5 for i in range(n)]
        row = {"tokens": n, "hotcold_tok_s": hotcold_prefill(engine, ids)}
        if not args.no_llama and resolve_model_path(args.model).suffix == ".gguf":
            row["llama_tok_s"] = llama_prefill(resolve_model_path(args.model), args.threads, n)
        rows.append(row)
    print(f"\n{cpu_line()}\nmodel {args.model}, {args.threads} threads, one prompt at a time (no prefix cache), "
          f"chunks of {args.max_num_batched_tokens} token-equivalents")
    print(f"{'tokens':>7s} {'hotcold tok/s':>14s} {'attention share':>16s} {'llama.cpp tok/s':>16s} "
          f"{'share':>6s} {'hotcold/llama':>14s}")
    base = {k: rows[0][k] for k in ("hotcold_tok_s", "llama_tok_s") if k in rows[0]}
    for r in rows:
        r["hotcold_attention_share"] = 1 - r["hotcold_tok_s"] / base["hotcold_tok_s"]
        line = f"{r['tokens']:7d} {r['hotcold_tok_s']:14.1f} {r['hotcold_attention_share']:15.0%}"
        if "llama_tok_s" in r:
            r["llama_attention_share"] = 1 - r["llama_tok_s"] / base["llama_tok_s"]
            line += (f" {r['llama_tok_s']:16.1f} {r['llama_attention_share']:5.0%} "
                     f"{r['hotcold_tok_s'] / r['llama_tok_s']:13.2f}x")
        print(line)
    print(f"(attention share: relative to the {rows[0]['tokens']}-token prompt, which has some attention too)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": cpu_line(), "rows": rows,
                               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
