"""Which kernel path serves which shape, measured on the machine at hand (a second or two, once).

No speed constant tuned on one CPU holds on the next (shared/README.md: the native kernels beat torch 2x on
one machine and lost 3x on another). So at first use this times, on a matrix larger than the caches:
- for fp32 and bf16 weights, the native kernels against torch's F.linear at 1..128 tokens: the native path
  serves up to the largest token count where it wins at every count up to it;
- for quantized weights, the integer-dot kernel against dequantized tiles through torch's GEMM;
- the default dtype for checkpoints that are not quantized: bf16 unless its decode is >10% slower than fp32's,
  or its 128-token product (prefill) more than 1.5x slower (torch has no fast bf16 GEMM without avx512_bf16);
- up to which share of active neurons the sparse FFN over quantized rows beats the dense one (a plan's layer
  whose predicted density is above it stays dense);
- whether Q4 matrices are re-laid in tiles of four rows at load (where the build has that kernel).
The result is cached in HOTCOLD_CACHE per CPU model and flags, ISA level, thread count, kernel sources and
torch version; `hotcold info` prints it. HOTCOLD_CALIBRATE=0 skips measuring and assumes the native path
for up to 8 tokens, bf16, and tiles wherever the build has them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import native

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
SHAPE = (2048, 1024)  # 8 MB in fp32: past the L2 caches, as real weights are


@dataclass
class Calibration:
    cpu: str
    isa: str
    threads: int
    max_native_tokens: dict[str, int]  # "float32", "bfloat16", "quant" -> tokens
    default_dtype: str
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> path -> time per T
    measured: bool = True
    # largest share of a quantized FFN's neurons at which the sparse FFN (gathered gate/up rows, down
    # input-major: input_sparse.sparse_ffn; its predictor excluded) still beats the dense one at one token:
    # above it a plan's layer stays dense
    sparse_max_density: float = 0.25
    # whether Q4_0/Q4_1 matrices run faster re-laid in tiles of four rows (kernels/tiles.c) than in the file's
    # rows, where this build has the tiled kernel: one token from memory and 16 tokens, both timed
    tiles: bool = False

    def summary(self) -> str:
        paths = ", ".join(f"{k} <= {v} tokens" for k, v in self.max_native_tokens.items())
        how = "measured" if self.measured else "assumed (HOTCOLD_CALIBRATE=0)"
        return (f"CPU {self.cpu}; ISA {self.isa}; {self.threads} threads; native kernels for {paths}; "
                f"default dtype {self.default_dtype}; sparse quantized FFN up to {self.sparse_max_density:.0%} "
                f"of neurons; Q4 matrices {'in tiles of four rows' if self.tiles else 'in rows'} ({how})")


def race(a, b, reps: int = 5, flush=None) -> tuple[float, float]:
    """Best times of two ways to do one thing, run alternately (a busy machine slows both alike); `flush`,
    when given, runs untimed before each (to time them from memory rather than from the caches)."""
    best = [float("inf"), float("inf")]
    a(), b()
    for _ in range(reps):
        for i, fn in enumerate((a, b)):
            if flush is not None:
                flush()
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def _race_all(native_fn, torch_fn, xs) -> tuple[list[float], list[float]]:
    pairs = [race(lambda x=x: native_fn(x), lambda x=x: torch_fn(x)) for x in xs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _crossover(native_s: list[float], torch_s: list[float], points: tuple = TOKENS) -> int | float:
    """The largest point up to which the first way wins at every point (0 when it never does)."""
    best = 0
    for point, a, b in zip(points, native_s, torch_s):
        if a > b:
            break
        best = point
    return best


def measure() -> Calibration:
    from . import quant

    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(*SHAPE, generator=gen) * 0.02
    seconds: dict[str, dict[str, list[float]]] = {}
    crossover: dict[str, int] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        w = w32.to(dtype)
        xs = [torch.randn(T, SHAPE[1], generator=gen).to(dtype) for T in TOKENS]
        nat, tor = _race_all(lambda x, w=w: native.linear(x, w), lambda x, w=w: F.linear(x, w), xs)
        seconds[name] = {"native": nat, "torch": tor}
        crossover[name] = _crossover(nat, tor)
    tiles, seconds["tiles"] = _tiles_win(gen)
    wq = quant.quantize(w32, "Q4_0")
    wq = quant.tile(wq) if tiles else wq  # as the loader will lay such matrices out
    xs = [torch.randn(T, SHAPE[1], generator=gen) for T in TOKENS]
    nat, tor = _race_all(lambda x: quant.dots(wq, x), lambda x: quant.linear(x, wq, max_native_tokens=0), xs)
    seconds["quant"] = {"native": nat, "torch": tor}
    crossover["quant"] = _crossover(nat, tor)
    sparse_max_density, seconds["sparse_ffn"] = _sparse_crossover(gen, tiles)
    fastest = {k: [min(a, b) for a, b in zip(v["native"], v["torch"])] for k, v in seconds.items()
               if "torch" in v}
    bf16, fp32 = fastest["bfloat16"], fastest["float32"]
    bf16_ok = bf16[0] <= 1.1 * fp32[0] and bf16[-2] <= 1.5 * fp32[-2]  # within noise, half the bytes wins
    return Calibration(native.cpu_model(), native.best_isa(), native.threads(), crossover,
                       "bfloat16" if bf16_ok else "float32", seconds, sparse_max_density=sparse_max_density,
                       tiles=tiles)


TILE_SHAPE, TILE_COPIES = (8192, 1024), 12  # 4.7 MB of Q4_0 each, 57 MB in turn: past the last-level cache


def _tiles_win(gen: torch.Generator) -> tuple[bool, dict[str, list[float]]]:
    """Whether tiles of four rows beat the file's rows where this build has the tiled kernel: at one token
    from memory (a decode step) and at 16 tokens (batched decode, prefill), each within 5%, and overall."""
    from . import quant

    if not quant.tiles_supported("Q4_0"):
        return False, {}
    w = quant.quantize(torch.randn(*TILE_SHAPE, generator=gen) * 0.02, "Q4_0")
    rows = [quant.QuantTensor(w.data.clone(), w.qtype, w.cols) for _ in range(TILE_COPIES)]
    tiles = [quant.tile(r) for r in rows]
    out: dict[str, list[float]] = {"rows": [], "tiles": []}
    for T in (1, 16):
        x = torch.randn(T, TILE_SHAPE[1], generator=gen)
        a, b = race(lambda x=x: [quant.dots(m, x) for m in rows], lambda x=x: [quant.dots(m, x) for m in tiles])
        out["rows"].append(a)
        out["tiles"].append(b)
    wins = all(t <= 1.05 * r for r, t in zip(out["rows"], out["tiles"])) and sum(out["tiles"]) < sum(out["rows"])
    return wins, out


DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
FFN_SHAPE = (1024, 4096)  # hidden, intermediate: 7 MB of Q4_0 gate/up/down per layer
FFN_LAYERS = 8  # taken in turn, 56 MB: past the last-level cache, as a model's layers are


def _sparse_crossover(gen: torch.Generator, tiles: bool) -> tuple[float, dict[str, list[float]]]:
    """The largest density (of DENSITIES) up to which the sparse quantized FFN over that share of neurons beats
    the dense one at one token, at every density up to it (0 when it never does); times are for all layers."""
    from . import input_sparse, quant

    H, I = FFN_SHAPE
    w = torch.randn(2 * I, H, generator=gen) * 0.02
    gate_up, down = quant.quantize(w, "Q4_0"), quant.quantize(w.reshape(-1)[: H * I].reshape(H, I), "Q4_0")
    copy = lambda m: quant.QuantTensor(m.data.clone(), m.qtype, m.cols)  # noqa: E731
    # copies of the same values (the point is where the bytes live), each laid out as its path holds it: the
    # sparse FFN's gate/up rows and input-major down, the dense FFN's matrices as the loader leaves them
    laid = quant.tile if tiles else copy
    sparse_layers = [(copy(gate_up), input_sparse.to_input_major(down)) for _ in range(FFN_LAYERS)]
    dense_layers = [(laid(gate_up), laid(down)) for _ in range(FFN_LAYERS)]
    x = torch.randn(1, H, generator=gen)
    sparse, dense = [], []
    for d in DENSITIES:
        idx = torch.randperm(I, generator=gen)[: int(d * I)].sort().values
        a, b = race(lambda idx=idx: [input_sparse.sparse_ffn(x, gu, dm, 2, idx, 2, 0) for gu, dm in sparse_layers],
                     lambda: [quant.ffn(x, gu, dn, 2, 2, 0, max_native_tokens=1) for gu, dn in dense_layers])
        sparse.append(a)
        dense.append(b)
    return float(_crossover(sparse, dense, DENSITIES)), {"sparse": sparse, "dense": dense}


def _path() -> str:
    key = "\0".join([native.cpu_model(), " ".join(sorted(native.cpu_flags())), native.best_isa(),
                     str(native.threads()), native.source_hash(), torch.__version__, repr(TOKENS), repr(SHAPE),
                     hashlib.sha256(open(__file__, "rb").read()).hexdigest()])  # what is measured, and how
    return str(native.cache_dir() / f"calibration-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


@functools.cache
def current() -> Calibration:
    """This machine's calibration: read from the cache, else measured now (and cached)."""
    if native.load() is None or os.environ.get("HOTCOLD_CALIBRATE", "1") == "0":
        from . import quant

        n = 8 if native.load() is not None else 0
        return Calibration(native.cpu_model(), native.best_isa() if native.load() else "none", native.threads(),
                           {"float32": n, "bfloat16": n, "quant": 8}, "bfloat16", measured=False,
                           tiles=quant.tiles_supported("Q4_0"))
    path = _path()
    try:
        with open(path) as f:
            return Calibration(**json.load(f))
    except (OSError, ValueError, TypeError):
        pass
    cal = measure()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(cal), f, indent=1)
    os.replace(tmp, path)
    return cal


def forget() -> None:
    """Drop this machine's cached calibration: the next `current()` measures again."""
    current.cache_clear()
    try:
        os.remove(_path())
    except OSError:
        pass


def max_native_tokens(kind: torch.dtype | str) -> int:
    """Most tokens per call for which the native kernels are the faster path for weights of `kind`."""
    name = kind if isinstance(kind, str) else {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(kind)
    return current().max_native_tokens.get(name, 0) if name else 0


def default_dtype() -> torch.dtype:
    return torch.bfloat16 if current().default_dtype == "bfloat16" else torch.float32
