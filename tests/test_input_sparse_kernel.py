"""Input-sparse products over input-major quantized weights (kernels/tsparse.c, kernels/input_sparse.py).
References: float64 over gguf.quants' dequantized rows, with the inputs masked by brute force."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases
from test_quant import gguf_dequantize, over_threads, random_blocks

from hotcold.kernels import input_sparse, native, quant


def _bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the kernel may differ from float64 by, per token and output: each group's kept inputs are rounded
    to int16 (half a step of max|x_g| / 32767 each), plus fp32 rounding of the sums."""
    B, K = x.shape
    step = np.abs(x).reshape(B, K // 32, 32).max(-1) / 32767  # [B, groups]
    wg = np.abs(w).reshape(w.shape[0], K // 32, 32).sum(-1)  # [N, groups]
    return 0.5 * step @ wg.T + 1e-5 * np.abs(x) @ np.abs(w).T + 1e-30


@pytest.mark.parametrize("qtype", input_sparse.TYPES)
@pytest.mark.parametrize("rows", [32, 96, 160, 288])
def test_matches_float64_with_the_inputs_masked(qtype, rows):
    """Odd output counts (a partial pass), several tokens, a threshold that drops about half of the inputs,
    and tokens that run dense (sparse_tokens 0: every nonzero input kept)."""
    cols = 256
    raw = random_blocks(qtype, rows, cols, seed=rows)
    w = input_sparse.to_input_major(quant.from_gguf(raw, qtype, cols))
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(rows))
    x[1, :40] = 0.0
    flags = torch.tensor([1, 1, 0, 1, 0])
    ref_w = gguf_dequantize(raw, qtype, cols)
    xs = x.double().numpy()
    keep = (np.abs(xs) > 0.7) | (flags.numpy()[:, None] == 0)
    masked = np.where(keep, xs, 0.0)
    want = masked @ ref_w.T
    got = input_sparse.linear(x, w, 0.7, sparse_tokens=flags).double().numpy()
    assert np.all(np.abs(got - want) <= _bound(ref_w, masked))
    dense = xs @ ref_w.T
    assert np.abs(got[2] - dense[2]).max() <= _bound(ref_w, xs)[2].max()  # a dense token equals the dense product
    assert np.abs(got[0] - dense[0]).max() > 100 * _bound(ref_w, xs)[0].max()  # and a sparse one does not


@pytest.mark.parametrize("qtype", input_sparse.TYPES)
@pytest.mark.parametrize("cols", [96, 2080])  # 2080: the 4-bit rearrangement's slices of 1024 inputs, and a tail
def test_layout_is_lossless(qtype, cols):
    """The input-major rearrangement holds the GGUF's numbers exactly (no second rounding)."""
    rows = 160
    raw = random_blocks(qtype, rows, cols, seed=3)
    w = input_sparse.to_input_major(quant.from_gguf(raw, qtype, cols))
    assert w.shape == (rows, cols)
    assert np.array_equal(w.dequantize().double().numpy(), gguf_dequantize(raw, qtype, cols))
    assert w.nbytes == raw.size  # the same bytes: codes, scales and minimums, nothing added


def test_threshold_zero_equals_the_dense_product():
    rows, cols = 128, 512
    raw = random_blocks("Q4_1", rows, cols, seed=9)
    w = input_sparse.to_input_major(quant.from_gguf(raw, "Q4_1", cols))
    x = torch.randn(3, cols)
    ref_w = gguf_dequantize(raw, "Q4_1", cols)
    want = x.double().numpy() @ ref_w.T
    got = input_sparse.linear(x, w, 0.0).double().numpy()
    assert np.all(np.abs(got - want) <= _bound(ref_w, x.double().numpy()))


def test_rms_norm_folded_in():
    """linear(x, norm=g) keeps the inputs of the RMS-normed x over the threshold: float64 RMS norm (the
    formula), masked, times gguf's rows. An ordinary token, a tiny one (its mean square near eps) and a
    dense one (sparse_tokens 0)."""
    rows, cols, t, eps = 64, 128, 0.5, 1e-5
    raw = random_blocks("Q8_0", rows, cols, seed=4)
    w = input_sparse.to_input_major(quant.from_gguf(raw, "Q8_0", cols))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, cols, generator=gen) * torch.tensor([[3.0], [2e-3], [1.0]])
    norm = torch.rand(cols, generator=gen) + 0.5
    xd = x.double().numpy()
    normed = xd / np.sqrt((xd**2).mean(-1, keepdims=True) + eps) * norm.double().numpy()
    margin = np.abs(np.abs(normed[:2]) - t).min()
    assert margin > 1e-4, "an input lies at the threshold (fp32 may keep it where float64 drops it)"
    keep = (np.abs(normed) > t) | (np.arange(3) == 2)[:, None]
    masked = np.where(keep, normed, 0.0)
    ref_w = gguf_dequantize(raw, "Q8_0", cols)
    got = input_sparse.linear(x, w, t, norm=norm, eps=eps, sparse_tokens=torch.tensor([1, 1, 0])).double().numpy()
    assert np.all(np.abs(got - masked @ ref_w.T) <= _bound(ref_w, masked))
    assert 0.2 < keep[:2].mean() < 0.8  # the threshold drops a part of the inputs, not none or all


@pytest.mark.parametrize("qtype", input_sparse.TYPES)
def test_results_do_not_depend_on_threads_or_batch(qtype):
    """Bitwise the same on 1, 2 and 5 threads, and alone or in a batch, where consecutive tokens that keep the
    same rows share one unpacking of the codes (prompt tokens keep all; an exact zero makes a token's rows
    differ, and an odd count is padded)."""
    rows, cols = 288, 256
    w = input_sparse.to_input_major(quant.from_gguf(random_blocks(qtype, rows, cols), qtype, cols))
    x = torch.randn(7, cols)
    x[2, 5] = x[3, 40] = 0.0
    flags = torch.tensor([0, 0, 0, 0, 1, 0, 0])
    outs = over_threads(lambda: input_sparse.linear(x, w, 0.4, sparse_tokens=flags), (1, 2, 5))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    alone = torch.cat([input_sparse.linear(x[i: i + 1], w, 0.4, sparse_tokens=flags[i: i + 1]) for i in range(7)])
    assert torch.equal(alone, outs[0])


def test_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="multiple of 32 rows"):
        input_sparse.to_input_major(quant.from_gguf(random_blocks("Q4_0", 40, 64), "Q4_0", 64))
    with pytest.raises(ValueError, match="input-major storage takes"):
        input_sparse.to_input_major(quant.from_gguf(random_blocks("Q5_0", 32, 64), "Q5_0", 64))
    w = input_sparse.to_input_major(quant.from_gguf(random_blocks("Q4_0", 32, 64), "Q4_0", 64))
    with pytest.raises(ValueError, match="features"):
        input_sparse.linear(torch.ones(1, 32), w, 0.0)


_ISA_SCRIPT = """
import sys, json, torch
sys.path.insert(0, {tests!r})
from test_quant import random_blocks
from hotcold.kernels import input_sparse, native, quant
out = {{"isa": native.best_isa()}}
for t in input_sparse.TYPES:
    w = input_sparse.to_input_major(quant.from_gguf(random_blocks(t, 160, 256, seed=5), t, 256))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    out[t] = input_sparse.linear(x, w, 0.5).flatten().tolist()
print(json.dumps(out))
"""


def test_every_isa_path_agrees():
    """The vector path (int16 pairs) and the portable one compute the same integer sums: equal results."""
    import json

    results = {}
    for isa in native.available_isas():
        env = {**os.environ, "HOTCOLD_ISA": isa}
        script = _ISA_SCRIPT.format(tests=os.path.dirname(__file__))
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[isa] = json.loads(done.stdout.strip().splitlines()[-1])
    assert "portable" in results
    for res in results.values():
        for t in input_sparse.TYPES:
            y, r = np.array(res[t]), np.array(results["portable"][t])
            assert np.abs(y - r).max() <= 1e-6 * np.abs(r).max()


# ---------------------------------------------------------------- float weights: W^T and the gathered axpy

def _float_case(dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(11)
    w = (torch.randn(96, 160, generator=gen) * 0.1).to(dtype)
    x = torch.randn(3, 160, generator=gen)
    x[1] = 0.0  # a token that keeps nothing
    t = 0.6
    want = (x.double() * (x.abs() > t)) @ w.double().T
    return input_sparse.FloatInputMajor(w.T.contiguous().to(device)), x.to(device), t, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_input_major_matches_float64(dtype):
    """W^T rows of the kept inputs through the CPU gathered axpy: float64 with the inputs masked, within the
    rounding of the inputs to the weights' dtype."""
    w, x, t, want = _float_case(dtype)
    got = input_sparse.float_linear(x, w, t).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_triton_interpreted():
    """The GPU side's kernel (Triton's split-K gathered axpy) in Triton's interpreter, in a child pytest:
    TRITON_INTERPRET must be set before triton is first imported."""
    run_interpreter_cases(__file__, min_passed=2)


if INTERPRETED:  # only defined in that child, so the parent lists no skipped stand-ins

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_interp_float_input_major_triton(dtype):
        w, x, t, want = _float_case(dtype)
        got = input_sparse.float_linear(x, w, t, backend="triton").double()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.gpu
def test_float_input_major_on_cuda():
    w, x, t, want = _float_case(torch.bfloat16, "cuda")
    got = input_sparse.float_linear(x, w, t).double().cpu()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
