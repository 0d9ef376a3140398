"""The native CPU kernels (gathered.c): built once per machine with the system C compiler, called by ctypes.

Why C at all: torch has no gathered dot product, so the torch path copies the active rows out and reads
them again, reaching about half the memory bandwidth (benchmarks/ffn_cpu.py); gathered.c streams each row
once. The library is compiled with -march=native into HOTCOLD_CACHE (default ~/.cache/hotcold), keyed by
the source, the compiler and the CPU, so a cache shared across machines never runs foreign instructions.
With no compiler, or HOTCOLD_NATIVE=0, `load()` returns None and cpu_sparse keeps its torch path.
ctypes releases the GIL for the call, so CPU workers run these in parallel with other Python threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gathered.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "gathered_dots": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr],
    "gathered_axpy": [_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr],
    "gathered_ffn": [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr,
                     ctypes.c_int, ctypes.c_int, ctypes.c_int, _ptr, _ptr],
}
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, _cpu_id(), " ".join(FLAGS)]).encode())
    cache = Path(os.environ.get("HOTCOLD_CACHE") or Path.home() / ".cache" / "hotcold").expanduser()
    return cache / "native" / f"gathered-{key.hexdigest()[:16]}.so"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library (building it on first use), or None where it cannot be built."""
    if os.environ.get("HOTCOLD_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        path = _library_path(compiler)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # atomic: concurrent builders race safely
                out = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True,
                               capture_output=True)
                out.replace(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError):
        return None
    for name, args in _SIGNATURES.items():
        for suffix in SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


# Most tokens per call for which the native kernels beat torch (benchmarks/ffn_cpu.py, 2-core Zen 5: the
# whole FFN at 576x1536 and 2048x5632, all rows): fp32 up to 8 tokens, bf16 up to 2 (each token re-widens
# the bf16 row, while torch's bf16 GEMM amortises it).
MAX_TOKENS = {torch.float32: 8, torch.bfloat16: 2}


def preferred(tokens: int, *weights: torch.Tensor) -> bool:
    """True when the native kernels are the faster way to run `tokens` tokens over these weights."""
    return supports(*weights) and tokens <= min(MAX_TOKENS[w.dtype] for w in weights)


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


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def supports(*weights: torch.Tensor) -> bool:
    """True when the native kernels can read these weights (CPU, fp32/bf16, unit stride within a row)."""
    return all(w.device.type == "cpu" and w.dtype in SUFFIX and w.stride(-1) == 1 for w in weights) and (
        load() is not None)


def gathered_dots(w: torch.Tensor, parts: int, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fp32 [B, K, parts]: row idx[k] of w (`parts` consecutive H-long pieces) dotted with each x[b] (fp32)."""
    lib = load()
    B, H = x.shape
    K = idx.numel()
    out = torch.empty(B, K, parts, dtype=torch.float32)
    idx = idx.to(torch.int64).contiguous()
    x = x.contiguous()
    status = getattr(lib, f"gathered_dots_{SUFFIX[w.dtype]}")(
        w.data_ptr(), w.shape[0], w.stride(0), parts, idx.data_ptr(), K, x.data_ptr(), B, H, out.data_ptr())
    _check(status, idx, w.shape[0])
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 [T, out] = x @ w.T over every row of w [out, in]: a dense product of a few tokens."""
    return gathered_dots(w, 1, torch.arange(w.shape[0]), x.float())[..., 0]


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
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 y [B, H] of the gathered FFN in one native call: rows idx[k] of w_gate_up (`parts` pieces: gate
    then up, or up alone) dotted with x (fp32 [B, H]), biases (fp32 [I]) and activation codes
    (reference.FUNCTIONS) applied, zero where token_mask is False, h rounded to the weights' dtype, then
    summed over the rows of w_down_t."""
    lib = load()
    B, H = x.shape
    K = idx.numel()
    idx = idx.to(torch.int64).contiguous()
    x = x.contiguous()
    h = torch.empty(B * K * parts, dtype=torch.float32)
    y = torch.zeros(B, w_down_t.shape[-1], dtype=torch.float32)
    mask = None if token_mask is None else token_mask.contiguous().view(torch.uint8)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    status = getattr(lib, f"gathered_ffn_{SUFFIX[w_gate_up.dtype]}")(
        w_gate_up.data_ptr(), w_gate_up.shape[0], w_gate_up.stride(0), parts, w_down_t.data_ptr(),
        w_down_t.stride(0), idx.data_ptr(), K, x.data_ptr(), B, H, ptr(up_bias), ptr(gate_bias), ptr(mask),
        gate_fn, up_fn, int(w_gate_up.dtype != torch.float32), h.data_ptr(), y.data_ptr())
    _check(status, idx, w_gate_up.shape[0])
    return y


def _check(status: int, idx: torch.Tensor, n_rows: int) -> None:
    if status:
        raise IndexError(f"neuron ids must lie in [0, {n_rows}); got min {int(idx.min())}, max {int(idx.max())}")
