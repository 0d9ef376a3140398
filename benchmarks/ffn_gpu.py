"""One FFN layer on the GPU: hotcold's Triton gathered kernels against dense torch (cuBLAS).

bf16 SwiGLU at the Llama-2-7B shape (4096 x 11008) and the default model's (576 x 1536), batch 1/4/16,
density sweep; `--qtype q4_0|q4_1|q8_0` runs the sparse rows quantized (dequantized in the kernels; the
dense baseline stays bf16). Times are triton.testing.do_bench medians (it clears the L2 before every run, so the
weights come from HBM). The floor is the active weight bytes at the measured HBM bandwidth (a
device-to-device copy); %HBM = that bandwidth's share achieved on the active bytes.
On CUDA, "graph" columns time the same FFN (sparse and dense alike) replayed from one CUDA graph over enough
distinct copies of the layer that their bytes exceed the L2 four times: the kernels' own time, without the
host's launch gaps that eager do_bench includes (what a decode step run as a graph would see).

    python benchmarks/ffn_gpu.py                      # on a CUDA machine -> results/ffn_gpu.json
    python benchmarks/ffn_gpu.py --tune               # also sweep the kernels' block sizes
    python benchmarks/ffn_gpu.py --device cpu --tiny  # CI smoke: Triton interpreter, tiny shapes, seconds
                                                      #   -> results/ffn_gpu_smoke.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time
from pathlib import Path

import torch

from hotcold.kernels import cpu_sparse
from hotcold.kernels.qrows import QRows

SHAPES = {"7b": (4096, 11008), "default": (576, 1536), "tiny": (64, 192)}  # (hidden, intermediate)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bench_fn(device: str):
    """Median ms of fn: do_bench on CUDA; a perf_counter median in the interpreter smoke mode."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_bench(fn, n: int = 3) -> float:
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2] * 1e3

    return cpu_bench


def measure_hbm(device: str, bench, n_bytes: int) -> float:
    a = torch.ones(n_bytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    return 2 * n_bytes / bench(lambda: b.copy_(a)) / 1e6


class Layer:
    """One FFN's weights: `gate`, `up`, `down_t` as the sparse kernels read them (float, or kernels.qrows.QRows
    with --qtype), and `dense` (gate, up, down_t) in `dtype` for the dense baseline, the same values."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: str, seed: int = 0,
                 qtype: str | None = None):
        g = torch.Generator().manual_seed(seed)
        mk = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
        self.hidden, self.inter, self.dtype, self.device = hidden, inter, dtype, device
        weights = [mk(inter, hidden) for _ in range(3)]
        if qtype:  # the GGUF blocks' rows, dequantized in the kernels (quantized by kernels.quant, natively)
            from hotcold.kernels import qrows, quant

            rows = [qrows.from_quant(quant.quantize(w, qtype.upper())).to(device) for w in weights]
            self.gate, self.up, self.down_t = rows
            weights = [r.dequantize() for r in rows]
        self.dense = [w.to(dtype).to(device) for w in weights]
        if not qtype:
            self.gate, self.up, self.down_t = self.dense
        self.neuron_bytes = sum(w.nbytes for w in (self.gate, self.up, self.down_t)) // inter
        self.gen = g

    def exact(self) -> list[torch.Tensor]:
        """fp32 gate, up, down_t: the values the sparse path computes with (made when checked, not held)."""
        return [w.dequantize() if isinstance(w, QRows) else w.float() for w in (self.gate, self.up, self.down_t)]

    def inputs(self, batch: int, density: float):
        k = max(1, round(density * self.inter))
        idx = torch.randperm(self.inter, generator=self.gen)[:k].sort().values.to(self.device)
        x = torch.randn(batch, self.hidden, generator=self.gen).to(self.dtype).to(self.device)
        mask = (torch.rand(batch, k, generator=self.gen) < 0.5).to(self.device) if batch > 1 else None
        return x, idx, mask


def graph_ms(calls: list, reps: int = 10) -> float:
    """ms per call of `calls` (one per distinct layer copy) replayed as one captured CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles, allocator pools
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / len(calls)


def copies_for(active_bytes: int) -> int:
    """Distinct layer copies whose active bytes exceed the L2 four times (so a replay reads HBM), 32 at most
    (at 5% density and Q4_0 that is about twice the L2)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(2, min(32, -(-4 * l2 // max(1, active_bytes))))


def clone_rows(w):
    return QRows(*(None if t is None else t.clone() for t in (w.codes, w.scales, w.mins)), w.qtype) \
        if isinstance(w, QRows) else w.clone()


def tune(tri, L: Layer, bench, batch: int, density: float) -> dict:
    """Sweep block sizes of both kernels at one point; report the best against the defaults."""
    x, idx, mask = L.inputs(batch, density)
    dot = batch >= tri._DOT_MIN_BATCH
    gu_space = itertools.product([16, 32, 64] if dot else [4, 8, 16, 32], [32, 64, 128] if dot else
                                 [64, 128, 256, 512], [2, 4, 8])
    h = tri.gathered_gate_up(x, L.up, idx, "swiglu", L.gate, None, mask)
    out = dict(batch=batch, density=density, k=idx.numel())
    best = None
    gu_default = bench(lambda: tri.gathered_gate_up(x, L.up, idx, "swiglu", L.gate, None, mask))
    for bk, bh, w in gu_space:
        kw = dict(block_k=bk, block_h=bh, num_warps=w)
        ms = bench(lambda kw=kw: tri.gathered_gate_up(x, L.up, idx, "swiglu", L.gate, None, mask, **kw))
        best = min(best or (ms, kw), (ms, kw), key=lambda t: t[0])
    out["gate_up"] = dict(default_ms=gu_default, best_ms=best[0], best=best[1])
    best = None
    down_default = bench(lambda: tri.gathered_down(h, L.down_t, idx, L.dtype))
    for bk, bh, s, w in itertools.product([16, 32, 64] if dot else [8, 16, 32, 64], [64, 128, 256],
                                          [None, 1, 2, 4, 8, 16], [2, 4, 8]):
        kw = dict(block_k=bk, block_h=bh, splits=s, num_warps=w)
        ms = bench(lambda kw=kw: tri.gathered_down(h, L.down_t, idx, L.dtype, **kw))
        best = min(best or (ms, kw), (ms, kw), key=lambda t: t[0])
    out["down"] = dict(default_ms=down_default, best_ms=best[0], best=best[1])
    return out


def copies(n: int, weights: list) -> list[list]:
    """n sets of `weights`: the originals and n-1 clones (distinct memory, same values)."""
    return [weights] + [[clone_rows(w) for w in weights] for _ in range(n - 1)]


def dense_layer(x, weights):
    gate, up, down_t = weights
    return cpu_sparse.dense_ffn(x, up, "swiglu", gate, None, down_t)


def sparse_layer(tri, dtype, x, idx, mask, weights):
    gate, up, down_t = weights
    h = tri.gathered_gate_up(x, up, idx, "swiglu", gate, None, mask)
    return tri.gathered_down(h, down_t, idx, dtype)


def graph_or_error(layer, weights: list, active_bytes: int, device: str) -> float | str | None:
    """graph_ms of layer(weights) over enough copies of the weights (None off CUDA; the error's text if the
    capture fails, so that the sweep goes on with its eager numbers)."""
    if device != "cuda":
        return None
    try:
        return graph_ms([functools.partial(layer, ws) for ws in copies(copies_for(active_bytes), weights)])
    except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed
        return f"{type(e).__name__}: {e}"[:300]
    finally:
        torch.cuda.empty_cache()  # the copies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape only (the smoke mode)")
    p.add_argument("--shapes", default="7b,default")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--qtype", default=None, choices=["q4_0", "q4_1", "q8_0"],
                   help="the sparse rows quantized (kernels.qrows: dequantized in the kernels); dense stays --dtype")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
    p.add_argument("--tune", action="store_true", help="sweep block sizes at density 0.1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cpu":
        if not args.tiny:
            p.error("--device cpu runs Triton's interpreter (100-700x slower): use it with --tiny")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --device cpu --tiny for the interpreter smoke mode")
    from hotcold.kernels import triton_ffn as tri

    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    densities = [0.5, 0.1] if args.tiny and args.device == "cpu" else [float(d) for d in args.densities.split(",")]
    dtype = DTYPES[args.dtype]
    bench = bench_fn(args.device)
    hbm = measure_hbm(args.device, bench, (1 << 30) if args.device == "cuda" else (16 << 20))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}: device-to-device copy {hbm:.0f} GB/s")
    result = dict(device=name, hbm_gbs=hbm, dtype=args.dtype, qtype=args.qtype, activation="swiglu", rows=[],
                  tune=[])
    print(f"{'shape':>8} {'batch':>5} {'density':>7} {'dense ms':>9} {'sparse ms':>9} {'floor ms':>8} "
          f"{'GB/s':>6} {'%HBM':>5} {'x dense':>7} {'rel err':>8}")
    for shape in shapes:
        hidden, inter = SHAPES[shape]
        L = Layer(hidden, inter, dtype, args.device, qtype=args.qtype)
        rows = [L.gate, L.up, L.down_t]
        for batch in (int(b) for b in args.batches.split(",")):
            x, _, _ = L.inputs(batch, 1.0)
            dense_ms = bench(functools.partial(dense_layer, x, L.dense))
            dense_graph = graph_or_error(functools.partial(dense_layer, x), L.dense,
                                         sum(w.nbytes for w in L.dense), args.device)
            for d in densities:
                x, idx, mask = L.inputs(batch, d)
                ms = bench(functools.partial(sparse_layer, tri, L.dtype, x, idx, mask, rows))
                sparse_graph = graph_or_error(functools.partial(sparse_layer, tri, L.dtype, x, idx, mask),
                                              rows, idx.numel() * L.neuron_bytes, args.device)
                # correctness next to the timing: the union of all neurons with no mask is the dense FFN
                err = None
                if d == 1.0 or args.device == "cpu":
                    full = torch.arange(inter, device=args.device)
                    g32, u32, d32 = L.exact()
                    want = cpu_sparse.dense_ffn(x.float(), u32, "swiglu", g32, None, d32)
                    got = sparse_layer(tri, L.dtype, x, full, None, rows).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                gbytes = idx.numel() * L.neuron_bytes / 1e9
                row = dict(shape=shape, hidden=hidden, intermediate=inter, batch=batch, density=d, k=idx.numel(),
                           dense_ms=dense_ms, sparse_ms=ms, floor_ms=gbytes / hbm * 1e3, gbs=gbytes / ms * 1e3,
                           pct_hbm=100 * gbytes / ms * 1e3 / hbm, speedup=dense_ms / ms, rel_err_vs_dense=err,
                           dense_graph_ms=dense_graph, sparse_graph_ms=sparse_graph)
                if isinstance(sparse_graph, float) and isinstance(dense_graph, float):
                    row.update(graph_pct_hbm=100 * gbytes / sparse_graph * 1e3 / hbm,
                               graph_speedup=dense_graph / sparse_graph)
                result["rows"].append(row)
                print(f"{shape:>8} {batch:5d} {d:7.2f} {dense_ms:9.4f} {ms:9.4f} {row['floor_ms']:8.4f} "
                      f"{row['gbs']:6.0f} {row['pct_hbm']:5.0f} {row['speedup']:7.2f} "
                      f"{'' if err is None else f'{err:8.1e}'}"
                      + (f"  graph: dense {dense_graph:.4f} sparse {sparse_graph:.4f} ms, {row['graph_pct_hbm']:.0f}%"
                         f" HBM, {row['graph_speedup']:.2f}x dense" if "graph_speedup" in row else
                         "" if sparse_graph is None else f"  graph: {sparse_graph} / {dense_graph}"), flush=True)
            if args.tune:
                t = tune(tri, L, bench, batch, 0.1)
                t.update(shape=shape)
                result["tune"].append(t)
                print(f"  tune {shape} batch {batch}: gate_up {t['gate_up']}, down {t['down']}", flush=True)
    worst = max((r["rel_err_vs_dense"] or 0.0) for r in result["rows"])
    result["max_rel_err_vs_dense"] = worst
    default_out = "ffn_gpu_smoke.json" if args.device == "cpu" else "ffn_gpu.json"
    out = Path(args.out or Path(__file__).parent / "results" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if worst > 3e-2:  # bf16 rounding of x and h is ~4e-3; anything far above is a broken kernel
        print(f"error: sparse output differs from the dense FFN by {worst:.2e} (relative)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
