"""One FFN layer on the CPU: the gathered (sparse) path of hotcold.kernels against dense torch.

Cache-cold timing: every call uses the next of several weight copies (together >= 4x the L3) and the next
of several random active sets, so no call finds its rows in cache. Times are medians over the calls of a
round, the lowest of 3 rounds (the 2 cores are shared: a round that another process disturbed is dropped).
Achieved GB/s = the weight bytes the call must read / time: for the sparse path only the active rows.

    python benchmarks/ffn_cpu.py                     # both shapes, fp32 + bf16, batch 1, density sweep
    python benchmarks/ffn_cpu.py --quick             # default-model shape only, fewer repetitions
    python benchmarks/ffn_cpu.py --no-crossover      # skip the dense-fallback crossover search

Prints a table and writes benchmarks/results/ffn_cpu.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hotcold.kernels import cpu_sparse, native

SHAPES = {"7b": (4096, 11008), "default": (576, 1536)}  # (hidden, intermediate)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
L3_BYTES = 32 << 20


@dataclass
class Layer:
    """One copy of a SwiGLU layer, gate/up both interleaved ([I,2,H]) and separate."""

    gate_up: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor

    def __post_init__(self) -> None:  # gate/up views of gate_up, sliced once as the engine does
        self.packed_views = (self.gate_up[:, 0], self.gate_up[:, 1])


def make_layers(hidden: int, inter: int, dtype: torch.dtype, separate: bool) -> list[Layer]:
    per_copy = 3 * hidden * inter * dtype.itemsize * (5 / 3 if separate else 1)
    n = max(2, int(4 * L3_BYTES // per_copy) + 1)
    layers = []
    for _ in range(n):
        gate_up = (torch.randn(inter, 2, hidden) * hidden**-0.5).to(dtype)
        gate, up = (gate_up[:, 0].contiguous(), gate_up[:, 1].contiguous()) if separate else (None, None)
        layer = Layer(gate_up, gate, up, (torch.randn(inter, hidden) * inter**-0.5).to(dtype))
        for w in (layer.gate_up, layer.gate, layer.up, layer.down_t):
            if w is not None:
                native.use_huge_pages(w)  # as the loader does
        layers.append(layer)
    return layers


def median_ms(fn, n_calls: int, n_layers: int, n_sets: int, rounds: int = 3) -> float:
    """Lowest of `rounds` medians: a round disturbed by other processes on the shared cores is dropped."""
    fn(0, 0)
    medians = []
    for _ in range(rounds):
        times = []
        for i in range(max(1, n_calls // rounds)):
            t = time.perf_counter()
            fn(i % n_layers, i % n_sets)
            times.append(time.perf_counter() - t)
        medians.append(sorted(times)[len(times) // 2] * 1e3)
    return min(medians)


def measure_bandwidth(n_bytes: int = 1 << 30) -> dict[str, float]:
    """Streaming read (sum) and copy bandwidth of the machine, GB/s (median of 5)."""
    a = torch.ones(n_bytes // 4)
    b = torch.empty_like(a)
    out = {}
    for name, fn, moved in (("read_gbs", lambda: a.sum(), n_bytes), ("copy_gbs", lambda: b.copy_(a), 2 * n_bytes)):
        fn()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = moved / sorted(ts)[2] / 1e9
    return out


class Bench:
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, calls: int, separate: bool = True):
        self.hidden, self.inter, self.dtype, self.calls = hidden, inter, dtype, calls
        self.layers = make_layers(hidden, inter, dtype, separate)
        self.gen = torch.Generator().manual_seed(0)

    def ids(self, density: float, n_sets: int = 8) -> list[torch.Tensor]:
        k = max(1, round(density * self.inter))
        return [torch.randperm(self.inter, generator=self.gen)[:k].sort().values for _ in range(n_sets)]

    def time(self, fn, sets: list[torch.Tensor]) -> float:
        return median_ms(fn, self.calls, len(self.layers), len(sets))

    def dense(self, batch: int) -> float:
        x = torch.randn(batch, self.hidden).to(self.dtype)
        L = self.layers

        def run(i, _):
            return cpu_sparse.dense_ffn(x, L[i].up, "swiglu", L[i].gate, None, L[i].down_t)

        return self.time(run, [None])

    def sparse(self, batch: int, sets: list[torch.Tensor], packed: bool, config=cpu_sparse.DEFAULT_CONFIG):
        x = torch.randn(batch, self.hidden).to(self.dtype)
        L = self.layers
        masks = [torch.rand(batch, s.numel(), generator=self.gen) < 0.5 for s in sets] if batch > 1 else None

        def run(i, j):
            gate, up = L[i].packed_views if packed else (L[i].gate, L[i].up)
            m = masks[j] if masks else None
            return cpu_sparse.gathered_ffn(x, up, L[i].down_t, sets[j], "swiglu", gate, None, m, config,
                                           out_dtype=self.dtype)

        return self.time(run, sets)

    def gbytes(self, k: int) -> float:
        return 3 * k * self.hidden * self.dtype.itemsize / 1e9


def sweep(bench: Bench, densities: list[float], batch: int) -> list[dict]:
    dense_ms = bench.dense(batch)
    rows = [dict(density=1.0, path="dense", ms=dense_ms, gbs=bench.gbytes(bench.inter) / dense_ms * 1e3)]
    for d in densities:
        sets = bench.ids(d)
        k = sets[0].numel()
        for path, packed in (("sparse", True), ("sparse_separate", False)):
            ms = bench.sparse(batch, sets, packed)
            rows.append(dict(density=d, path=path, k=k, ms=ms, gbs=bench.gbytes(k) / ms * 1e3,
                             speedup=dense_ms / ms))
    return rows


def crossover(bench: Bench, batch: int, grid: list[float]) -> dict:
    """Smallest union density where the sparse path is no faster than dense (linear in between)."""
    dense_ms = bench.dense(batch)
    points, prev = [], None
    for d in grid:
        ratio = bench.sparse(batch, bench.ids(d), packed=True) / dense_ms
        points.append(dict(density=d, sparse_over_dense=ratio))
        if ratio >= 1.0:
            if prev is None:
                return dict(batch=batch, crossover=d, dense_ms=dense_ms, points=points)
            (d0, r0) = prev
            return dict(batch=batch, crossover=d0 + (1.0 - r0) * (d - d0) / (ratio - r0), dense_ms=dense_ms,
                        points=points)
        prev = (d, ratio)
    return dict(batch=batch, crossover=None, dense_ms=dense_ms, points=points)  # sparse wins everywhere


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="7b,default", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=0, help="timed calls per cell (default: by shape)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--crossover-batches", default="1,4,16")
    p.add_argument("--crossover-shapes", default="default,7b")
    p.add_argument("--no-crossover", action="store_true")
    p.add_argument("--quick", action="store_true", help="default shape, fewer calls, coarser crossover grid")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="array size for the bandwidth measurement")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ffn_cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes = args.crossover_shapes = "default"
    torch.manual_seed(0)
    bw = measure_bandwidth(args.bandwidth_mib << 20)
    print(f"threads {torch.get_num_threads()}, memory bandwidth: read {bw['read_gbs']:.1f} GB/s, "
          f"copy {bw['copy_gbs']:.1f} GB/s")
    result = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                               torch=torch.__version__, loadavg_start=os.getloadavg()[0], **bw),
                  config=asdict(cpu_sparse.DEFAULT_CONFIG), activation="swiglu", batch=args.batch, sweep=[],
                  crossover=[])
    densities = [float(d) for d in args.densities.split(",")]
    print(f"{'shape':>8} {'dtype':>9} {'density':>7} {'path':>16} {'ms':>9} {'GB/s':>6} {'%bw':>5} {'x dense':>7}")
    for shape in args.shapes.split(","):
        hidden, inter = SHAPES[shape]
        for dname in args.dtypes.split(","):
            calls = args.calls or (40 if shape == "7b" else 300) // (3 if args.quick else 1)
            bench = Bench(hidden, inter, DTYPES[dname], calls)
            for row in sweep(bench, densities, args.batch):
                row.update(shape=shape, hidden=hidden, intermediate=inter, dtype=dname,
                           pct_bw=100 * row["gbs"] / bw["read_gbs"])
                result["sweep"].append(row)
                print(f"{shape:>8} {dname:>9} {row['density']:7.2f} {row['path']:>16} {row['ms']:9.3f} "
                      f"{row['gbs']:6.1f} {row['pct_bw']:5.0f} {row.get('speedup', 1.0):7.2f}", flush=True)
            del bench
    if not args.no_crossover:
        grid = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0] if args.quick else [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                                   0.8, 0.9, 1.0]
        print("\ncrossover: union density above which dense is faster (packed sparse path)")
        for shape in args.crossover_shapes.split(","):
            hidden, inter = SHAPES[shape]
            for dname in args.dtypes.split(","):
                calls = args.calls or (15 if shape == "7b" else 100) // (2 if args.quick else 1)
                bench = Bench(hidden, inter, DTYPES[dname], calls, separate=True)
                for b in (int(v) for v in args.crossover_batches.split(",")):
                    c = crossover(bench, b, grid)
                    c.update(shape=shape, dtype=dname)
                    result["crossover"].append(c)
                    cross = "none (sparse always faster)" if c["crossover"] is None else f"{c['crossover']:.2f}"
                    print(f"{shape:>8} {dname:>9} batch {b:>2}: {cross}  (dense {c['dense_ms']:.3f} ms)", flush=True)
                del bench
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
