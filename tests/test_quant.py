"""Quantized kernels (kernels/quant.c) against gguf's own dequantization and float64 references.

The references are independent of the code under test: gguf.quants for block formats, and numpy's float64
for products, with the activations quantized per 32 by a numpy transcription of llama.cpp's rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from hotcold.kernels import native, quant

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"]
_HALF = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2]}


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in qtype's block layout, with its fp16 scales set to sane values (no inf/NaN)."""
    rng = np.random.default_rng(seed)
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for off in _HALF[qtype]:
        scale = rng.uniform(0.001, 0.02, size=(rows, cols // block)).astype(np.float16)
        if off == 2 and qtype in ("Q4_1", "Q5_1"):
            scale = -scale * 8  # a minimum
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def gguf_dequantize(raw: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(raw.shape[0], cols)


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """llama.cpp's per-32 int8 activations, dequantized: d = amax/127, q = round(x/d) (fp32, as the C does)."""
    x = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    return (np.rint(x * inv) * d).reshape(x.shape[0], -1).astype(np.float64)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf(qtype):
    cols = 512
    raw = random_blocks(qtype, 24, cols)
    w = quant.from_gguf(raw, qtype, cols)
    assert np.array_equal(w.dequantize().numpy(), gguf_dequantize(raw, qtype, cols))
    idx = torch.tensor([5, 0, 23, 5])
    assert np.array_equal(w.dequantize(idx).numpy(), gguf_dequantize(raw, qtype, cols)[idx.numpy()])


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_dots_match_float64(qtype, tokens):
    """Odd row counts, several tokens: within fp32 rounding of float64 over the quantized activations."""
    cols, rows = 768, 37
    raw = random_blocks(qtype, rows, cols, seed=tokens)
    w = quant.from_gguf(raw, qtype, cols)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    got = quant.dots(w, x)[..., 0].double().numpy()
    want = quantized_activations(x.numpy()) @ gguf_dequantize(raw, qtype, cols).T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # and within the activation quantization's error of the float product itself
    exact = x.double().numpy() @ gguf_dequantize(raw, qtype, cols).T
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


def test_gathered_dots_parts_and_ids():
    """Rows (idx[k] * 2 + p): gate and up rows of the chosen neurons, as the sparse path reads them."""
    cols, neurons = 256, 19
    raw = random_blocks("Q4_1", 2 * neurons, cols)
    w = quant.from_gguf(raw, "Q4_1", cols)
    idx = torch.tensor([18, 3, 3, 0, 11])
    x = torch.randn(2, cols)
    got = quant.dots(w, x, idx=idx, parts=2).double().numpy()  # [B, K, 2]
    deq = gguf_dequantize(raw, "Q4_1", cols).reshape(neurons, 2, cols)[idx.numpy()]
    want = np.einsum("bh,kph->bkp", quantized_activations(x.numpy()), deq)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(IndexError):
        quant.dots(w, x, idx=torch.tensor([0, neurons]), parts=2)


def rms_norm64(x, g, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * g in float64: the RMS norm as written (Llama's)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(g, dtype=np.float64)


def q8_blocks64(x: np.ndarray, w: np.ndarray, tie: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """float64 activations [B, n] as llama.cpp's Q8 blocks (per 32: d = amax / 127, q = round(x / d)), then
    dotted with w [rows, n]; and per output what a rounding the kernel may take the other way (x / d within
    `tie` of a half: fp32 normalization differs from float64 by a few ulps) can change: d * |w| each."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / 127
    u = np.divide(xb, d, out=np.zeros_like(xb), where=d != 0)
    near = np.abs(np.abs(u - np.floor(u)) - 0.5) < tie
    return (np.rint(u) * d).reshape(x.shape) @ w.T, (near * d).reshape(x.shape) @ np.abs(w).T


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_rms_norm_folded_into_the_product(qtype):
    """dots(norm=g, eps) = Q8 blocks of the float64 RMS norm, dotted with gguf's rows, within fp32 rounding
    (1e-5 of each token's outputs): a mean over H - 1 (1e-3 off) shows. Tokens of tiny magnitude (mean
    square 1e-6 and 9e-6 against eps 1e-5) are scaled by eps as much as by themselves: dropping it shows."""
    cols, eps = 512, 1e-5
    raw = random_blocks(qtype, 40, cols, seed=7)
    w = quant.from_gguf(raw, qtype, cols)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, cols, generator=gen) * torch.tensor([[3.0], [1e-3], [3e-3], [0.3]])
    g = torch.rand(cols, generator=gen) + 0.5
    got = quant.dots(w, x, norm=g, eps=eps)[..., 0].double().numpy()
    want, ties = q8_blocks64(rms_norm64(x.numpy(), g.numpy(), eps), gguf_dequantize(raw, qtype, cols))
    bound = 1e-5 * np.abs(want).max(-1, keepdims=True) + ties
    assert np.all(np.abs(got - want) <= bound), (np.abs(got - want) / np.abs(want).max(-1, keepdims=True)).max()


def test_rms_norm_matches_float64():
    """quant.rms_norm (what the dequantized-GEMM and input-sparse paths normalize with) against the formula,
    ordinary and tiny (eps-dominated) tokens alike."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 200, generator=gen) * torch.tensor([[2.0], [1e-3], [0.1]])
    g = torch.rand(200, generator=gen) + 0.5
    got = quant.rms_norm(x, g, 1e-5).double().numpy()
    want = rms_norm64(x.numpy(), g.numpy(), 1e-5)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_linear_past_the_native_tokens_folds_the_norm():
    """The large-batch path (dequantized tiles through torch's GEMM, no activation quantization) with the
    norm: float64 RMS norm times gguf's rows, within fp32 rounding."""
    cols = 256
    raw = random_blocks("Q4_1", 72, cols, seed=5)
    w = quant.from_gguf(raw, "Q4_1", cols)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, cols, generator=gen) * torch.tensor([[1.0], [2e-3], [4.0], [0.5], [1e-2]])
    g = torch.rand(cols, generator=gen) + 0.5
    got = quant.linear(x, w, max_native_tokens=0, norm=g, eps=1e-5).double().numpy()
    want = rms_norm64(x.numpy(), g.numpy(), 1e-5) @ gguf_dequantize(raw, "Q4_1", cols).T
    assert np.all(np.abs(got - want) <= 1e-5 * np.abs(want).max(-1, keepdims=True))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_ffn_one_call_matches_float64(qtype):
    """y = down . (silu(gate) * up)(rmsnorm(x)) in one native call vs float64 on the dequantized rows."""
    H, I = 256, 96
    gate, up, down = (random_blocks(qtype, r, c, seed=s) for s, (r, c) in enumerate([(I, H), (I, H), (H, I)]))
    w_gu = quant.interleave(quant.from_gguf(gate, qtype, H), quant.from_gguf(up, qtype, H))
    w_d = quant.from_gguf(down, qtype, I)
    x, g = torch.randn(4, H), torch.rand(H) + 0.5
    y = quant.ffn(x, w_gu, w_d, 2, 1, 0, norm=g, eps=1e-6, max_native_tokens=64).double().numpy()
    xd = x.double().numpy()
    xn = xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-6) * g.double().numpy()
    a, u = xn @ gguf_dequantize(gate, qtype, H).T, xn @ gguf_dequantize(up, qtype, H).T
    h = a / (1 + np.exp(-a)) * u
    want = h @ gguf_dequantize(down, qtype, I).T
    assert np.abs(y - want).max() <= 0.03 * np.abs(want).max()


@pytest.mark.parametrize("native_call", [True, False])
def test_ffn_gate_up_biases(native_call, monkeypatch):
    """Gate and up biases (fp32 [I * 2], a neuron's gate then up) added before the activation, each neuron its
    own whatever the token: float64 on gguf's rows. The one native call (kernels/block.c) quantizes both
    products' activations, so its reference does too (llama.cpp's Q8 blocks); past the native token count
    the products are float GEMMs of dequantized rows. Both within fp32 rounding (1e-5 of each token's scale)."""
    monkeypatch.setattr(quant, "_native_tokens", lambda: 64 if native_call else 0)
    qtype, H, I, eps = "Q8_0", 256, 96, 1e-6
    gate, up, down = (random_blocks(qtype, r, c, seed=10 + s) for s, (r, c) in enumerate([(I, H), (I, H), (H, I)]))
    w_gu = quant.interleave(quant.from_gguf(gate, qtype, H), quant.from_gguf(up, qtype, H))
    w_d = quant.from_gguf(down, qtype, I)
    gen = torch.Generator().manual_seed(12)  # no input near a rounding tie
    x, g = torch.randn(5, H, generator=gen), torch.rand(H, generator=gen) + 0.5
    bias = torch.randn(I, 2, generator=gen) * 10  # [neuron, gate/up]: of the products' own scale
    y = quant.ffn(x, w_gu, w_d, 2, 1, 0, gate_up_bias=bias.flatten(), norm=g, eps=eps).double().numpy()
    xn, b = rms_norm64(x.numpy(), g.numpy(), eps), bias.double().numpy()
    w_gate, w_up = gguf_dequantize(gate, qtype, H), gguf_dequantize(up, qtype, H)
    w_down = gguf_dequantize(down, qtype, I)
    if native_call:
        (a, ties_a), (u, ties_u) = q8_blocks64(xn, w_gate), q8_blocks64(xn, w_up)
        assert not ties_a.any() and not ties_u.any(), "an input lies near a rounding tie: pick another seed"
    else:
        a, u = xn @ w_gate.T, xn @ w_up.T
    a, u = a + b[:, 0], u + b[:, 1]
    h = a / (1 + np.exp(-a)) * u
    want, ties = q8_blocks64(h, w_down, tie=1e-3) if native_call else (h @ w_down.T, 0)
    assert np.all(np.abs(y - want) <= 1e-5 * np.abs(want).max(-1, keepdims=True) + ties)


def over_threads(fn, counts=(1, 2, 7)) -> list:
    """fn() run once on each native thread count (the count in force restored after)."""
    before = native.threads()
    try:
        outs = []
        for n in counts:
            native.set_threads(n)
            outs.append(fn())
        return outs
    finally:
        native.set_threads(before)


def test_results_do_not_depend_on_threads_or_batch():
    """The same ISA path on 1, 2 and 7 threads, and a token alone or among others: bitwise the same."""
    cols = 576
    w = quant.from_gguf(random_blocks("Q4_1", 301, cols), "Q4_1", cols)
    w_d = quant.from_gguf(random_blocks("Q4_1", cols, 160), "Q4_1", 160)
    w_gu = quant.from_gguf(random_blocks("Q4_1", 320, cols), "Q4_1", cols)
    x = torch.randn(9, cols)
    outs = over_threads(lambda: (quant.dots(w, x), quant.ffn(x, w_gu, w_d, 2, 1, 0, max_native_tokens=64)))
    for dots, ffn in outs[1:]:
        assert torch.equal(dots, outs[0][0]) and torch.equal(ffn, outs[0][1])
    alone = [quant.dots(w, x[i: i + 1]) for i in range(9)]
    assert torch.equal(torch.cat(alone), outs[0][0])
    alone = [quant.ffn(x[i: i + 1], w_gu, w_d, 2, 1, 0, max_native_tokens=64) for i in range(9)]
    assert torch.equal(torch.cat(alone), outs[0][1])


@pytest.mark.parametrize("qtype", quant.QUANTIZE_TYPES)
def test_quantize_matches_gguf(qtype):
    t = torch.randn(16, 256) * 0.05
    ours = quant.quantize(t, qtype)
    theirs = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[qtype])
    deq = gguf_dequantize(ours.data.numpy(), qtype, 256)
    ref = gguf_dequantize(np.asarray(theirs), qtype, 256)
    step = np.abs(t.numpy()).max() / (127 if qtype == "Q8_0" else 7)
    assert np.abs(deq - ref).max() <= step * 1.01  # the same grid, a rounding tie apart at most
    assert (deq == ref).mean() > 0.99


def test_bad_layout_and_unknown_type_are_refused():
    with pytest.raises(ValueError, match="bytes"):
        quant.QuantTensor(torch.zeros(4, 17, dtype=torch.uint8), "Q4_0", 32)
    with pytest.raises(ValueError, match="not run natively"):
        quant.QuantTensor(torch.zeros(4, 18, dtype=torch.uint8), "IQ4_XS", 32)
    w = quant.from_gguf(random_blocks("Q4_0", 4, 64), "Q4_0", 64)
    with pytest.raises(ValueError, match="features"):
        quant.dots(w, torch.randn(1, 32))


_ISA_SCRIPT = """
import json, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from test_quant import random_blocks
from hotcold.kernels import native, quant
out = {{"isa": native.best_isa()}}
x = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
for t in {types!r}:
    w = quant.from_gguf(random_blocks(t, 29, 768, seed=4), t, 768)
    runs = []
    for n in (1, 2, 7):
        native.set_threads(n)
        runs.append(quant.dots(w, x)[..., 0])
    out[t] = {{"same_bits": all(torch.equal(r, runs[0]) for r in runs), "y": runs[0].tolist()}}
print(json.dumps(out))
"""


def test_every_isa_path_agrees():
    """Each ISA level this CPU has (forced by HOTCOLD_ISA, one process each) plus the portable one: bitwise
    stable over thread counts, and within fp32 rounding of each other."""
    results = {}
    for isa in native.available_isas():
        env = {**os.environ, "HOTCOLD_ISA": isa}
        script = _ISA_SCRIPT.format(tests=os.path.dirname(__file__), types=TYPES)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[isa] = json.loads(out.stdout.strip().splitlines()[-1])
        assert results[isa]["isa"] == isa
    assert "portable" in results
    ref = results["portable"]
    for isa, res in results.items():
        for t in TYPES:
            assert res[t]["same_bits"], (isa, t)
            y, r = np.array(res[t]["y"]), np.array(ref[t]["y"])
            assert np.abs(y - r).max() <= 1e-5 * np.abs(r).max(), (isa, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_kernels_bitwise_over_threads(dtype):
    """The fp32/bf16 native kernels split rows (dots) or columns (axpy) over threads: same bits for any count."""
    gen = torch.Generator().manual_seed(5)
    packed = torch.randn(203, 2, 200, generator=gen).to(dtype)
    down_t = torch.randn(203, 200, generator=gen).to(dtype)
    idx, x = torch.randperm(203, generator=gen)[:77], torch.randn(3, 200, generator=gen)
    before = native.threads()
    try:
        outs = []
        for n in (1, 2, 7):
            native.set_threads(n)
            outs.append((native.gathered_dots(packed, 2, idx, x), native.gathered_axpy(down_t, idx, x[:, :77]),
                         native.gathered_ffn(packed, 2, down_t, idx, x, 1, 0)))
        for other in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(other, outs[0]))
    finally:
        native.set_threads(before)
