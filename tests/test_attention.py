"""The native paged attention (kernels/attention.c) against float64 causal softmax attention written out here.

paged_attention has no Python wrapper of its own (kernels/block.c calls it inside the one-call block), so the
test calls the library's symbol by ctypes. The cases: block tables whose blocks are scattered and out of order,
grouped-query heads, a sliding window, and several sequences at different positions in one step (a prefill
chunk longer than one tile of 8 tokens, a decode token, a chunk at the start). Every cache row no sequence
wrote holds NaN, so a read outside a token's keys poisons its output.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from hotcold.kernels import native

SHIFT = 3  # blocks of 8 positions
TRAP = 0  # block 0 belongs to no sequence: NaN, and the id of every unused table slot
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def native_paged_attention():
    """paged_attention(qkv, qkv_dim, out, k_cache, v_cache, tables, seq, pos, B, n_heads, n_kv, D, max_blocks,
    shift, window) as declared in kernels/native.h (a function object of its own: the shared library's
    attributes are left as they are)."""
    lib = native.load()
    assert lib is not None, "the native kernels did not build (a C compiler is needed)"
    proto = ctypes.CFUNCTYPE(None, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, *[_i64] * 7)
    return proto(("paged_attention", lib))


def float64_attention(q, k, v, lo: int, hi: int) -> np.ndarray:
    """softmax(q k^T / sqrt(D)) v over keys lo .. hi - 1: q [n_heads, D], k and v [positions, n_kv, D]."""
    n_heads, D = q.shape
    group = n_heads // k.shape[1]
    out = np.empty((n_heads, D))
    for h in range(n_heads):
        keys, values = k[lo:hi, h // group], v[lo:hi, h // group]
        s = keys @ q[h] / np.sqrt(D)
        w = np.exp(s - s.max())
        out[h] = w @ values / w.sum()
    return out


def run_case(D: int, window: int, n_heads: int = 6, n_kv: int = 2, seed: int = 0):
    """Three sequences in one step: (sequence, first position, tokens); returns native and float64 outputs."""
    rng = np.random.default_rng(seed)
    steps = [(0, 57, 13), (1, 95, 1), (2, 0, 5)]  # a chunk over two tiles, a decode token, a fresh prompt
    lengths = [first + n for _, first, n in steps]
    max_blocks = max(-(-n >> SHIFT) for n in lengths) + 2
    n_blocks = 1 + sum(-(-n >> SHIFT) for n in lengths)
    ids = rng.permutation(np.arange(1, n_blocks))  # scattered and out of order; TRAP never handed out
    tables = np.full((len(steps), max_blocks), TRAP, dtype=np.int64)
    k_cache = np.full((n_blocks, 1 << SHIFT, n_kv, D), np.nan, dtype=np.float32)
    v_cache = k_cache.copy()
    keys, values, used = [], [], 0
    for s, n in enumerate(lengths):
        need = -(-n >> SHIFT)
        tables[s, :need] = ids[used: used + need]
        used += need
        k = rng.standard_normal((n, n_kv, D)).astype(np.float32)
        v = rng.standard_normal((n, n_kv, D)).astype(np.float32)
        for p in range(n):
            row = tables[s, p >> SHIFT]
            k_cache[row, p & ((1 << SHIFT) - 1)] = k[p]
            v_cache[row, p & ((1 << SHIFT) - 1)] = v[p]
        keys.append(k.astype(np.float64))
        values.append(v.astype(np.float64))
    seq = np.array([s for s, _, n in steps for _ in range(n)], dtype=np.int64)
    pos = np.array([first + i for _, first, n in steps for i in range(n)], dtype=np.int64)
    B, qkv_dim = len(seq), (n_heads + 2 * n_kv) * D
    # queries scaled so scores spread over a few units: softmax weights far from uniform and far from one-hot
    qkv = (rng.standard_normal((B, qkv_dim)) * 1.5).astype(np.float32)
    qkv[:, n_heads * D:] = np.nan  # the k and v parts of the step's rows are not attention's to read
    out = np.full((B, n_heads, D), np.nan, dtype=np.float32)
    arrays = [np.ascontiguousarray(a) for a in (qkv, k_cache, v_cache, tables, seq, pos)]
    qkv, k_cache, v_cache, tables, seq, pos = arrays
    native_paged_attention()(qkv.ctypes.data, qkv_dim, out.ctypes.data, k_cache.ctypes.data, v_cache.ctypes.data,
                             tables.ctypes.data, seq.ctypes.data, pos.ctypes.data, B, n_heads, n_kv, D, max_blocks,
                             SHIFT, window)
    want = np.empty((B, n_heads, D))
    for b in range(B):
        p = int(pos[b])
        lo = max(0, p - window + 1) if window > 0 else 0
        q = qkv[b, : n_heads * D].astype(np.float64).reshape(n_heads, D)
        want[b] = float64_attention(q, keys[seq[b]], values[seq[b]], lo, p + 1)
    return out.astype(np.float64), want


@pytest.mark.parametrize("D", [64, 128, 40])  # the two specialised head sizes and the generic one (scalar tail)
@pytest.mark.parametrize("window", [0, 20])
def test_matches_float64_causal_attention(D, window):
    """Within fp32 rounding of float64 (1e-6 of the values' scale): the softmax weights' exp polynomial is
    accurate to ~2e-7, so a wrong coefficient (~2e-5) or a key read past a token's window or position fails."""
    got, want = run_case(D, window, seed=D + window)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    assert err <= 1e-6 * np.abs(want).max(), f"max abs error {err:.3g}"


def test_the_window_matters_on_these_cases():
    """The cases reach past the window (positions up to 95 against a window of 20): the float64 references with
    and without it differ, so the test above would see a kernel that ignored the window."""
    _, want_window = run_case(64, 20, seed=84)
    _, want_full = run_case(64, 0, seed=84)
    assert np.abs(want_window - want_full).max() > 0.1
