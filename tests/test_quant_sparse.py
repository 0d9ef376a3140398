"""Sparse products over quantized rows (kernels/qsparse.c): the axpy over down_t / W^T rows and the gathered
FFN of the active neurons. References: float64 over gguf.quants' dequantized rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant import TYPES, gguf_dequantize, quantized_activations, random_blocks

from hotcold.kernels import input_sparse, native, quant


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_axpy_matches_float64(qtype, tokens):
    """Odd row counts, repeated and unordered ids, some zero coefficients: float64 over gguf's dequantize."""
    rows, cols = 41, 768
    raw = random_blocks(qtype, rows, cols, seed=tokens)
    w = quant.from_gguf(raw, qtype, cols)
    idx = torch.tensor([40, 3, 3, 17, 0, 22, 9])
    h = torch.randn(tokens, idx.numel(), generator=torch.Generator().manual_seed(2))
    h[0, 1] = 0.0
    got = quant.axpy(w, h, idx).double().numpy()
    want = h.double().numpy() @ gguf_dequantize(raw, qtype, cols)[idx.numpy()]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_axpy_refuses_bad_ids_and_shapes():
    w = quant.from_gguf(random_blocks("Q8_0", 8, 64), "Q8_0", 64)
    with pytest.raises(IndexError):
        quant.axpy(w, torch.ones(1, 2), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="one value per row id"):
        quant.axpy(w, torch.ones(1, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_sparse_ffn_matches_float64(qtype):
    """h = relu(gate) * up of the listed neurons (RMS norm folded in, biases, per-token masks), then the axpy
    over down_t: float64 on the dequantized rows, with llama.cpp's int8 activations for the dots."""
    H, I, T = 256, 96, 3
    gate, up, down_t = (random_blocks(qtype, I, H, seed=s) for s in range(3))
    w_gu = quant.interleave(quant.from_gguf(gate, qtype, H), quant.from_gguf(up, qtype, H))
    w_d = quant.from_gguf(down_t, qtype, H)
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(T, H, generator=gen), torch.rand(H, generator=gen) + 0.5
    bias = torch.randn(I, 2, generator=gen) * 0.1
    idx = torch.tensor([95, 0, 7, 50, 51, 12])
    mask = torch.rand(T, idx.numel(), generator=gen) > 0.3
    y = quant.sparse_ffn(x, w_gu, w_d, 2, idx, 2, 0, mask=mask, gate_up_bias=bias.reshape(-1), norm=g, eps=1e-6)
    xd = x.double().numpy()
    xn = xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-6) * g.double().numpy()
    xq = quantized_activations(xn)
    i = idx.numpy()
    a = xq @ gguf_dequantize(gate, qtype, H)[i].T + bias[i, 0].double().numpy()
    u = xq @ gguf_dequantize(up, qtype, H)[i].T + bias[i, 1].double().numpy()
    h = np.maximum(a, 0) * u * mask.numpy()
    want = h @ gguf_dequantize(down_t, qtype, H)[i]
    assert np.abs(y.double().numpy() - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_sparse_ffn_over_input_major_down_matches_float64(qtype):
    """The same FFN with down kept as the file stores it ([H, I] blocks, rearranged input-major without
    re-rounding): float64 over gguf's dequantized down itself, within the int8 activations of the dots and
    the int16 of the kept inputs; a masked or unlisted neuron contributes nothing."""
    H, I, T = 256, 96, 3
    gate, up = (random_blocks(qtype, I, H, seed=s) for s in range(2))
    down = random_blocks(qtype, H, I, seed=2)
    w_gu = quant.interleave(quant.from_gguf(gate, qtype, H), quant.from_gguf(up, qtype, H))
    w_d = input_sparse.to_input_major(quant.from_gguf(down, qtype, I))
    assert w_d.nbytes <= quant.from_gguf(down, qtype, I).nbytes  # no second, larger copy
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(T, H, generator=gen), torch.rand(H, generator=gen) + 0.5
    bias = torch.randn(I, 2, generator=gen) * 0.1
    idx = torch.tensor([95, 0, 7, 50, 51, 12, 33, 64])
    mask = torch.rand(T, idx.numel(), generator=gen) > 0.3
    y = input_sparse.sparse_ffn(x, w_gu, w_d, 2, idx, 2, 0, mask=mask, gate_up_bias=bias.reshape(-1), norm=g,
                                eps=1e-6)
    xd = x.double().numpy()
    xq = quantized_activations(xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-6) * g.double().numpy())
    i = idx.numpy()
    a = xq @ gguf_dequantize(gate, qtype, H)[i].T + bias[i, 0].double().numpy()
    u = xq @ gguf_dequantize(up, qtype, H)[i].T + bias[i, 1].double().numpy()
    want = (np.maximum(a, 0) * u * mask.numpy()) @ gguf_dequantize(down, qtype, I)[:, i].T
    assert np.abs(y.double().numpy() - want).max() <= 1e-3 * np.abs(want).max()


def test_sparse_ffn_with_every_neuron_equals_the_dense_ffn_on_transposed_down():
    """All neurons listed, no mask: the dense one-call FFN over down [H, I], with down_t its transpose
    re-quantized to Q8_0 (a second rounding), within that rounding and the int8 activations'."""
    H, I = 128, 64
    w_gu = quant.from_gguf(random_blocks("Q8_0", 2 * I, H), "Q8_0", H)
    down = quant.from_gguf(random_blocks("Q8_0", H, I, seed=1), "Q8_0", I)
    down_t = quant.transpose(down)
    assert down_t.shape == (I, H) and down_t.qtype == "Q8_0"
    x = torch.randn(2, H)
    dense = quant.ffn(x, w_gu, down, 2, 2, 0, max_native_tokens=64).double()
    # the dense path quantizes h to int8 before the down product; the axpy keeps it in fp32
    sparse = quant.sparse_ffn(x, w_gu, down_t, 2, torch.arange(I), 2, 0).double()
    assert (sparse - dense).abs().max() <= 0.02 * dense.abs().max()


def test_sparse_results_do_not_depend_on_threads_or_batch():
    """1, 2 and 7 threads: the same bits; a token alone or among others (its own mask): the same bits."""
    H, I = 576, 160
    w_gu = quant.from_gguf(random_blocks("Q4_1", 2 * I, H), "Q4_1", H)
    w_d = quant.from_gguf(random_blocks("Q4_1", I, H, seed=1), "Q4_1", H)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, H, generator=gen)
    idx = torch.randperm(I, generator=gen)[:53].sort().values
    mask = torch.rand(6, 53, generator=gen) > 0.5
    before = native.threads()
    try:
        outs = []
        for n in (1, 2, 7):
            native.set_threads(n)
            outs.append(quant.sparse_ffn(x, w_gu, w_d, 2, idx, 2, 0, mask=mask))
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        for t in range(6):  # alone, over only its own neurons
            own = idx[mask[t]]
            alone = quant.sparse_ffn(x[t: t + 1], w_gu, w_d, 2, own, 2, 0)
            assert torch.equal(alone[0], outs[0][t])
    finally:
        native.set_threads(before)
