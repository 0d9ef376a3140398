"""The native CPU kernels (kernels/*.c): built per machine and ISA level, called by ctypes.

Why C at all: torch has no gathered dot product and no product over GGUF's quantized blocks; the C kernels
stream each row once, over all cores (a thread pool that splits rows or columns; results bitwise the same
for any thread count). One library is built per ISA level with the system C compiler into HOTCOLD_CACHE
(default ~/.cache/hotcold/native), keyed by the sources, the compiler and the flags:
- `avx512`: AVX-512 with VNNI (integer dot products by vpdpbusd);
- `avx2`: AVX2 and FMA (x86-64-v3);
- `portable`: whatever the compiler targets by default (SSE2 on x86-64, plain C elsewhere).
The best level the CPU's flags (/proc/cpuinfo) allow is loaded; HOTCOLD_ISA forces one (tests use it to
run every level this machine has). Threads: HOTCOLD_THREADS, else every CPU this process may run on.
With no compiler, or HOTCOLD_NATIVE=0, `load()` returns None and the torch paths run instead.
ctypes releases the GIL for each call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / f"{name}.c" for name in ("pool", "gathered", "formats", "quant", "tiles", "qsparse", "tsparse",
                                           "attention", "block")]
HEADERS = [HERE / "native.h"]
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-Wno-psabi"]
OPENMP = ["-fopenmp"]  # dropped where the compiler has no OpenMP: the kernels then run on the calling thread
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mtune=native"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "portable": [],
}
# CPU flags each level needs (Linux /proc/cpuinfo names).
ISA_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c", "bmi2", "movbe"},
    "portable": set(),
}
_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    **{f"gathered_dots_{s}": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr] for s in ("f32", "bf16")},
    **{f"gathered_axpy_{s}": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr] for s in ("f32", "bf16")},
    **{f"gathered_ffn_{s}": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr,
                             _int, _int, _int, _ptr, _ptr, ctypes.c_float] for s in ("f32", "bf16")},
    "quant_dots": [_ptr, _int, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, ctypes.c_float, _ptr, _ptr],
    "quant_ffn": [_ptr, _int, _i64, _ptr, _int, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_float, _ptr, _int,
                  _int, _ptr, _ptr, ctypes.c_float],
    "quant_block": [_ptr, _i64, _i64, _ptr, _ptr, ctypes.c_float, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr,
                    _ptr, _int, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                    _ptr, ctypes.c_float, _ptr],
    "quant_axpy": [_ptr, _int, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr],
    "quant_sparse_ffn": [_ptr, _int, _i64, _ptr, _int, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr,
                         ctypes.c_float, _ptr, _ptr, _int, _int, ctypes.c_float, _ptr, _ptr],
    "tsparse_linear": [_ptr, _ptr, _ptr, _int, _i64, _i64, _ptr, _i64, ctypes.c_float, _ptr, _ptr],
    "quant_dequantize": [_ptr, _int, _i64, _i64, _i64, _ptr, _i64, _ptr],
    "quant_tile": [_ptr, _int, _i64, _i64, _ptr],
    "quant_untile": [_ptr, _int, _i64, _i64, _ptr, _i64, _ptr],
    "tiles_supported": [_int],
    "quant_quantize": [_ptr, _int, _i64, _i64, _ptr],
    "quant_block_bytes": [_int],
    "quant_block_size": [_int],
    "pool_configure": [_int, _i64],
    "pool_threads": [],
}
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_isa() -> str:
    """The ISA level to run: HOTCOLD_ISA if set (it must be one the CPU has), else the best one it has."""
    return _best_isa(os.environ.get("HOTCOLD_ISA"))


@functools.cache
def _best_isa(forced: str | None) -> str:
    have = available_isas()
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"HOTCOLD_ISA={forced!r}: choose from {', '.join(ISA_FLAGS)}")
        if forced not in have:
            raise ValueError(f"HOTCOLD_ISA={forced!r}: this CPU lacks it (it has {', '.join(have)})")
        return forced
    return have[0]


def available_isas() -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [isa for isa, needs in ISA_NEEDS.items() if (x86 or not needs) and needs <= cpu_flags()]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(n: int, what: str) -> int:
    """n threads, if 1 <= n <= the usable CPUs: OpenMP teams spin, so more threads than CPUs only wait on each
    other (1000 made a 3-token run take minutes; 100000 crashed libgomp)."""
    cpus = usable_cpus()
    if not 1 <= n <= cpus:
        raise ValueError(f"{what} {n}: expected 1 to {cpus} (the CPUs this process may run on)")
    return n


def default_threads() -> int:
    env = os.environ.get("HOTCOLD_THREADS")
    if not env:
        return usable_cpus()
    if not env.strip().isdigit():
        raise ValueError(f"HOTCOLD_THREADS={env!r}: expected a whole number of threads")
    return check_threads(int(env), "HOTCOLD_THREADS")


def _library_path(compiler: str, isa: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*text, version, " ".join(BASE_FLAGS + OPENMP + ISA_FLAGS[isa])]).encode())
    return cache_dir() / "native" / f"hotcold-{isa}-{key.hexdigest()[:16]}.so"


def cache_dir() -> Path:
    return Path(os.environ.get("HOTCOLD_CACHE") or Path.home() / ".cache" / "hotcold").expanduser()


def source_hash() -> str:
    """A hash of the kernels' sources: calibrations made for other kernels are not reused."""
    return hashlib.sha256(b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library for this CPU's ISA level (built on first use), or None where it cannot be built.
    HOTCOLD_NATIVE and HOTCOLD_ISA are read once per process."""
    if os.environ.get("HOTCOLD_NATIVE", "1") == "0":
        return None
    return _load(best_isa())


@functools.cache
def _load(isa: str) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        path = _library_path(compiler, isa)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # atomic: concurrent builders race safely
                out = Path(tmp) / path.name
                command = [compiler, *BASE_FLAGS, *ISA_FLAGS[isa], *map(str, SOURCES), "-o", str(out), "-lm"]
                if subprocess.run([*command, *OPENMP], capture_output=True).returncode:
                    subprocess.run(command, check=True, capture_output=True)
                out.replace(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError):
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.pool_configure(default_threads(), -1)
    return lib


def set_threads(n: int) -> int:
    """Threads for every later native call (the caller's included); returns the count now in force."""
    lib = load()
    return 1 if lib is None else lib.pool_configure(max(1, int(n)), -1)


def threads() -> int:
    lib = load()
    return 1 if lib is None else lib.pool_threads()


def preferred(tokens: int, *weights: torch.Tensor) -> bool:
    """True when the native kernels are the faster way to run `tokens` tokens over these weights: up to the
    crossover that kernels.calibrate measured on this machine for each dtype."""
    from hotcold.kernels import calibrate

    return supports(*weights) and tokens <= min(calibrate.max_native_tokens(w.dtype) for w in weights)


MADV_HUGEPAGE, MADV_COLLAPSE, HUGE = 14, 25, 2 << 20


def use_huge_pages(t: torch.Tensor) -> bool:
    """Back a CPU tensor's memory with 2 MiB pages (Linux): scattered rows on 4 KiB pages cost a TLB walk
    each (1.3-1.5x slower gathers). MADV_HUGEPAGE marks the range, MADV_COLLAPSE (Linux >= 6.1) moves it
    now. Only for long-lived weights: a global switch (THP_MEM_ALLOC_ENABLE) also gives every short-lived
    activation a 2 MiB page to fault in and zero, which halved batched serving throughput. True on success."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    start = -(-t.data_ptr() // HUGE) * HUGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE * HUGE
    if end <= start:
        return False
    libc = _libc()
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_COLLAPSE) == 0


MADV_DONTNEED, PAGE = 4, 4096


def release_mapped(addr: int, nbytes: int) -> None:
    """Drop the pages of a read-only file mapping that a copy has just been taken from: they leave this
    process's resident memory (a later read faults them back in from the page cache). Loading a model copies
    each tensor out of its memory-mapped file; without this the file's pages stay resident beside the copies
    (peak 2.5x the file)."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    start = addr // PAGE * PAGE
    end = -(-(addr + nbytes) // PAGE) * PAGE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def release_heap() -> None:
    """Give the heap's free memory back to the system (glibc malloc_trim): loading and converting weights
    frees large temporaries that would otherwise stay resident (measured: 300 MB on a 1.1 GB model)."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except AttributeError:  # not glibc
            pass


M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -3, 32 << 20  # glibc's mallopt parameter; its dynamic maximum (64-bit)


@contextlib.contextmanager
def large_frees_returned() -> Iterator[None]:
    """While loading: allocations of 1 MiB and more are mapped, so freeing one returns it to the system.
    Loading allocates and frees one tensor-sized temporary after another, and glibc's heap kept them
    (its mmap threshold grows with every large chunk freed): measured, 7B-shaped Q4_0 (1.14 GB file), load
    peak 1.40x -> 1.27x the file above the process's baseline. Afterwards the threshold is glibc's dynamic
    maximum, where it grows to anyway, so activations keep reusing heap memory (mapping each one afresh
    costs page faults on every step)."""
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)


def _mallopt(param: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            _libc().mallopt(param, value)
        except AttributeError:  # not glibc
            pass


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def supports(*weights: torch.Tensor) -> bool:
    """True when the native kernels can read these weights (CPU, fp32/bf16, unit stride within a row)."""
    return all(w.device.type == "cpu" and w.dtype in SUFFIX and w.stride(-1) == 1 for w in weights) and (
        load() is not None)


def gathered_dots(w: torch.Tensor, parts: int, idx: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """fp32 [B, K, parts]: row idx[k] of w (`parts` consecutive H-long pieces) dotted with each x[b] (fp32);
    idx None: every row (K = rows of w)."""
    lib = load()
    B, H = x.shape
    K = w.shape[0] if idx is None else idx.numel()
    out = torch.empty(B, K, parts, dtype=torch.float32)
    idx = None if idx is None else idx.to(torch.int64).contiguous()
    x = x.contiguous()
    status = getattr(lib, f"gathered_dots_{SUFFIX[w.dtype]}")(
        w.data_ptr(), w.shape[0], w.stride(0), parts, None if idx is None else idx.data_ptr(), K, x.data_ptr(), B,
        H, out.data_ptr())
    _check(status, idx, w.shape[0])
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 [T, out] = x @ w.T over every row of w [out, in]: a dense product of a few tokens."""
    return gathered_dots(w, 1, None, x.float())[..., 0]


def gathered_axpy(w: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H] = sum_k h[:, k] * w[idx[k]] (h fp32 [B, K])."""
    lib = load()
    B, K = h.shape
    H = w.shape[-1]
    y = torch.zeros(B, H, dtype=torch.float32)
    idx = idx.to(torch.int64).contiguous()
    h = h.contiguous()
    status = getattr(lib, f"gathered_axpy_{SUFFIX[w.dtype]}")(
        w.data_ptr(), w.shape[0], w.stride(0), idx.data_ptr(), K, h.data_ptr(), B, H, y.data_ptr())
    _check(status, idx, w.shape[0])
    return y


def gathered_ffn(w_gate_up: torch.Tensor, parts: int, w_down_t: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                 gate_fn: int, up_fn: int, up_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None, threshold: float = 0.0) -> torch.Tensor:
    """fp32 y [B, H] of the gathered FFN in one native call: rows idx[k] of w_gate_up (`parts` pieces: gate
    then up, or up alone) dotted with x (fp32 [B, H]), biases (fp32 [I]) and activation codes
    (reference.FUNCTIONS, with FATReLU's `threshold`) applied, zero where token_mask is False, h rounded to
    the weights' dtype, then summed over the rows of w_down_t."""
    lib = load()
    B, H = x.shape
    K = idx.numel()
    idx = idx.to(torch.int64).contiguous()
    x = x.contiguous()
    h = torch.empty(B * K * (parts + 1), dtype=torch.float32)
    y = torch.zeros(B, w_down_t.shape[-1], dtype=torch.float32)
    mask = None if token_mask is None else token_mask.contiguous().view(torch.uint8)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    status = getattr(lib, f"gathered_ffn_{SUFFIX[w_gate_up.dtype]}")(
        w_gate_up.data_ptr(), w_gate_up.shape[0], w_gate_up.stride(0), parts, w_down_t.data_ptr(),
        w_down_t.stride(0), idx.data_ptr(), K, x.data_ptr(), B, H, ptr(up_bias), ptr(gate_bias), ptr(mask),
        gate_fn, up_fn, int(w_gate_up.dtype != torch.float32), h.data_ptr(), y.data_ptr(), threshold)
    _check(status, idx, w_gate_up.shape[0])
    return y


def _check(status: int, idx: torch.Tensor, n_rows: int) -> None:
    if status:
        raise IndexError(f"neuron ids must lie in [0, {n_rows}); got min {int(idx.min())}, max {int(idx.max())}")
