"""Held-out perplexity of the quantized default model: hotcold against `llama-perplexity` on the same GGUF
and the same text, scored the way llama-perplexity scores it.

    python benchmarks/perplexity_peer.py [--model default] [--context 512] [--tokens 8192]

llama-perplexity cuts the token stream into chunks of `context` tokens and scores only the second half of
each chunk (every token there has at least context/2 of history). This script does the same with hotcold
in three ways: the GGUF blocks kept with every product on int8 activations (what decoding runs), the same
with the calibrated paths (long prefill chunks take dequantized tiles through torch's float GEMM), and
dequantized to float32 (the exact weights, float activations), so that the cost of quantizing activations
is visible beside llama.cpp's (which quantizes them too). Text: the built-in corpus's held-out
documents (Python's stdlib docstrings).
Prints a table and writes benchmarks/results/perplexity_peer.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hotcold.engine.loader import load_model, resolve_model_path
from hotcold.profiler.corpus import builtin_texts


@torch.inference_mode()
def chunked_ppl(model, ids: list[int], context: int) -> tuple[float, int]:
    """llama-perplexity's rule: per chunk of `context` tokens, the tokens of the second half, each predicted
    from everything before it in the chunk."""
    first, total, count = context // 2, 0.0, 0
    for start in range(0, len(ids) - context + 1, context):
        chunk = torch.tensor(ids[start: start + context])
        logits = model.forward_sequence(chunk)
        total += float(F.cross_entropy(logits[first:-1].double(), chunk[first + 1:], reduction="sum"))
        count += context - 1 - first
    return math.exp(total / count), len(ids) // context


def _all_neurons_sparse(model, down_type: str) -> None:
    """Every FFN through the sparse path (engine/quant_sparse.py) with a plan that keeps every neuron (oracle
    threshold -1): the result differs from dense only by down's second rounding into down_t (none when down is
    kept input-major)."""
    from hotcold.engine.counters import FFNCounters
    from hotcold.engine.plan import LayerPlan
    from hotcold.engine.quant_sparse import QuantSparseFFN

    counters = FFNCounters()
    for layer in model.layers:
        n = layer.ffn.intermediate_size
        plan = LayerPlan(index=0, threshold=-1.0, cett=0.0, sparsity=0.0, num_neurons=n, hot_ids=torch.arange(0),
                         frequency=torch.zeros(n))
        layer.ffn = QuantSparseFFN(layer.ffn, plan, "oracle", "threshold", counters, down_type=down_type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens to use (whole chunks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--down-t", nargs="*", default=["Q4_1", "Q8_0", "input-major"], metavar="TYPE",
                    help="also score the sparse path with down re-quantized neuron-major to these types, or kept "
                         "input-major (the default; no re-rounding), every neuron kept")
    ap.add_argument("--out", default="benchmarks/results/perplexity_peer.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_cpu import cpu_line
    from peer import tool

    path = resolve_model_path(args.model)
    torch.set_num_threads(args.threads)
    rows = []
    text, ids = "", []
    from hotcold.kernels import quant

    calibrated = quant._native_tokens
    for dtype, int8 in ((None, True), (None, False), ("float32", False)):
        # int8: every product through the integer kernels, as decode runs them (by default a 512-token
        # prefill takes dequantized tiles through torch's float GEMM, past the calibrated crossover)
        quant._native_tokens = (lambda: 1 << 30) if int8 else calibrated
        loaded = load_model(path, dtype=dtype)
        if not ids:
            for doc in builtin_texts()[1]:
                text += doc + "\n\n"
                ids = loaded.tokenizer.encode(text)
                if len(ids) >= args.tokens:
                    break
            # cut the text where the token budget ends, so that both engines read the same characters
            ids = ids[: args.tokens]
            text = loaded.tokenizer.decode(ids)
            ids = loaded.tokenizer.encode(text)
        t0 = time.perf_counter()
        ppl, chunks = chunked_ppl(loaded.model, ids, args.context)
        name = ("hotcold, GGUF blocks, int8 activations" if int8 else "hotcold, GGUF blocks, calibrated paths"
                if dtype is None else "hotcold, dequantized to float32")
        rows.append({"engine": name, "perplexity": ppl, "chunks": chunks, "seconds": time.perf_counter() - t0})
    quant._native_tokens = lambda: 1 << 30
    for down_type in args.down_t:  # what re-quantizing down neuron-major (the sparse path's down_t) costs
        loaded = load_model(path)
        _all_neurons_sparse(loaded.model, down_type)
        t0 = time.perf_counter()
        ppl, chunks = chunked_ppl(loaded.model, ids, args.context)
        down = "down input-major" if down_type == "input-major" else f"down_t as {down_type}"
        rows.append({"engine": f"hotcold, GGUF blocks, {down}, sparse kernel, every neuron",
                     "perplexity": ppl, "chunks": chunks, "seconds": time.perf_counter() - t0})
    quant._native_tokens = calibrated
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    t0 = time.perf_counter()
    out = subprocess.run([tool("llama-perplexity"), "-m", str(path), "-f", f.name, "-c", str(args.context),
                          "-t", str(args.threads), "-b", str(args.context)], capture_output=True, text=True)
    log = out.stdout + out.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if not final:
        raise SystemExit(f"llama-perplexity failed:\n{log[-2000:]}")
    rows.append({"engine": "llama.cpp llama-perplexity", "perplexity": float(final.group(1)),
                 "chunks": int(chunks.group(1)) if chunks else None, "seconds": time.perf_counter() - t0})
    peer = rows[-1]["perplexity"]
    print(f"\n{cpu_line()}")
    print(f"model {path.name}, {len(ids)} held-out tokens, context {args.context}, second half of each chunk scored")
    print(f"{'engine':42s} {'perplexity':>10s} {'vs llama.cpp':>12s} {'chunks':>6s}")
    for r in rows:
        print(f"{r['engine']:42s} {r['perplexity']:10.4f} {100 * (r['perplexity'] / peer - 1):+11.2f}% "
              f"{r['chunks'] or '-':>6}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"model": str(path), "context": args.context, "tokens": len(ids),
                                    "machine": cpu_line(), "rows": rows,
                                    "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
