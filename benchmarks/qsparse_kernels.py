"""The sparse FFN over quantized rows (kernels/qsparse.c) against the dense one (kernels/quant.c), at Llama-2-7B's
FFN shape (4096 x 11008), random blocks: how close the gathered path stays to the dense path's bandwidth.

    python benchmarks/qsparse_kernels.py [--qtype Q4_0] [--tokens 1] [--threads 2]

Rows: the axpy over down_t rows alone and the whole one-call sparse FFN (dots of the active gate/up rows,
activation, axpy over their down_t rows; down_t in Q8_0 as the engine stores it), at 10%, 50% and 100% of
the neurons, beside the dense one-call FFN (down as GGUF stores it). Each case is timed 5 times interleaved,
minimum kept. Prints a table and writes benchmarks/results/qsparse_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import cpu_line  # noqa: E402
from test_quant import random_blocks  # noqa: E402

from hotcold.kernels import native, quant  # noqa: E402

I, H = 11008, 4096


def _time(fn, n: int = 10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtype", default="Q4_0", help="gate/up and dense down type (down_t is Q8_0)")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/qsparse_kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native.set_threads(args.threads)
    q = args.qtype
    gate_up = quant.from_gguf(random_blocks(q, 2 * I, H, seed=2), q, H)
    down = quant.from_gguf(random_blocks(q, H, I, seed=1), q, I)
    down_t = quant.transpose(down)
    x = torch.randn(args.tokens, H)
    cases = {"dense FFN (down as stored)": (lambda: quant.ffn(x, gate_up, down, 2, 2, 0, max_native_tokens=1 << 20),
                                            gate_up.nbytes + down.nbytes)}
    for share in (0.1, 0.5, 1.0):
        k = int(I * share)
        idx = torch.randperm(I, generator=torch.Generator().manual_seed(0))[:k].sort().values
        h = torch.randn(args.tokens, k)
        cases[f"axpy over down_t, {share:.0%}"] = (lambda h=h, idx=idx: quant.axpy(down_t, h, idx),
                                                   k * down_t.data.shape[1])
        cases[f"sparse FFN, {share:.0%}"] = (lambda idx=idx: quant.sparse_ffn(x, gate_up, down_t, 2, idx, 2, 0),
                                             k * (2 * gate_up.data.shape[1] + down_t.data.shape[1]))
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(5):
        for name, (fn, _) in cases.items():
            runs[name].append(_time(fn))
    rows = [{"case": name, "ms": 1e3 * min(runs[name]), "bytes": nb, "gb_s": nb / min(runs[name]) / 1e9}
            for name, (_, nb) in cases.items()]
    print(f"\n{cpu_line()}")
    print(f"{q} gate/up, Q8_0 down_t, {H} x {I}, {args.tokens} token(s), {args.threads} threads, min of 5")
    print(f"{'case':34s} {'ms':>8s} {'MB read':>8s} {'GB/s':>6s}")
    for r in rows:
        print(f"{r['case']:34s} {r['ms']:8.3f} {r['bytes'] / 1e6:8.1f} {r['gb_s']:6.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": cpu_line(), "qtype": q, "tokens": args.tokens, "threads": args.threads,
                               "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
