"""Q4_0/Q4_1 matrices in tiles of four rows (kernels/tiles.c) against gguf's dequantization and float64: the
layout is lossless, and the four-row kernel computes what float64 does over the same blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant import gguf_dequantize, over_threads, quantized_activations, random_blocks

from hotcold.kernels import input_sparse, quant

TILED = [t for t in ("Q4_0", "Q4_1") if quant.tiles_supported(t)]
needs_tiles = pytest.mark.skipif(not TILED, reason="this CPU has no four-row kernel (AVX-512 VNNI)")


@needs_tiles
@pytest.mark.parametrize("qtype", TILED)
@pytest.mark.parametrize("rows", [1, 6, 37])
def test_tiles_are_lossless(qtype, rows):
    """Any row count (a last partial tile): untiled bytes are the file's, dequantized rows are gguf's."""
    cols = 256
    raw = random_blocks(qtype, rows, cols, seed=rows)
    w = quant.tile(quant.from_gguf(raw, qtype, cols))
    assert w.shape == (rows, cols) and w.nbytes == -(-rows // 4) * 4 * raw.shape[1]
    assert np.array_equal(quant.untile(w).data.numpy(), raw)
    want = gguf_dequantize(raw, qtype, cols)
    assert np.array_equal(w.dequantize().numpy(), want)
    idx = torch.tensor([rows - 1, 0, rows // 2])
    assert np.array_equal(w.dequantize(idx).numpy(), want[idx.numpy()])
    assert np.array_equal(quant.untile(w, idx).data.numpy(), raw[idx.numpy()])
    assert np.array_equal(quant.dequantize_rows(w, start=rows // 2).numpy(), want[rows // 2:])
    back = quant.untile(w, in_place=True)  # a plan taking the matrix over: its own bytes re-laid
    assert np.array_equal(back.data.numpy(), raw) and not back.tiled_rows
    assert (back.data.data_ptr() == w.data.data_ptr()) == (rows % 4 == 0)  # a partial tile: a copy


@needs_tiles
@pytest.mark.parametrize("qtype", TILED)
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_tiled_dots_match_float64(qtype, tokens):
    """Odd rows and an odd block count, 1-6 tokens (the kernel takes four at a time): float64 over the
    quantized activations and gguf's rows; the same as a product read by pairs of rows (parts 2)."""
    cols, rows = 800, 38
    raw = random_blocks(qtype, rows, cols, seed=tokens)
    w = quant.tile(quant.from_gguf(raw, qtype, cols))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    got = quant.dots(w, x)[..., 0]
    want = quantized_activations(x.numpy()) @ gguf_dequantize(raw, qtype, cols).T
    assert np.abs(got.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()
    assert torch.equal(quant.dots(w, x, parts=2).reshape(tokens, rows), got)
    assert torch.equal(quant.linear(x, w, max_native_tokens=64), got)
    exact = x.double().numpy() @ gguf_dequantize(raw, qtype, cols).T  # the large-batch path: dequantized tiles
    assert np.abs(quant.linear(x, w, max_native_tokens=0).double().numpy() - exact).max() <= 1e-5 * np.abs(exact).max()


@needs_tiles
def test_tiled_results_do_not_depend_on_threads_or_batch():
    """1, 2 and 7 threads, a token alone or among 8 others: bitwise the same, for products and the FFN."""
    cols, qtype = 576, TILED[-1]
    w = quant.tile(quant.from_gguf(random_blocks(qtype, 301, cols), qtype, cols))
    w_d = quant.tile(quant.from_gguf(random_blocks(qtype, cols, 160, seed=1), qtype, 160))
    w_gu = quant.tile(quant.from_gguf(random_blocks(qtype, 320, cols, seed=2), qtype, cols))
    x = torch.randn(9, cols)
    outs = over_threads(lambda: (quant.dots(w, x), quant.ffn(x, w_gu, w_d, 2, 1, 0, max_native_tokens=64)))
    for dots, ffn in outs[1:]:
        assert torch.equal(dots, outs[0][0]) and torch.equal(ffn, outs[0][1])
    assert torch.equal(torch.cat([quant.dots(w, x[i: i + 1]) for i in range(9)]), outs[0][0])
    alone = [quant.ffn(x[i: i + 1], w_gu, w_d, 2, 1, 0, max_native_tokens=64) for i in range(9)]
    assert torch.equal(torch.cat(alone), outs[0][1])


@needs_tiles
def test_what_gathers_rows_refuses_or_untiles_tiles():
    """Gathered products refuse a tiled matrix in one line; input-major conversion reads through the tiles."""
    cols, qtype = 256, TILED[0]
    raw = random_blocks(qtype, 64, cols)
    w = quant.tile(quant.from_gguf(raw, qtype, cols))
    with pytest.raises(ValueError, match="tiled"):
        quant.dots(w, torch.randn(1, cols), idx=torch.tensor([3]))
    with pytest.raises(ValueError, match="tiled"):
        quant.interleave(w, w)
    assert torch.equal(input_sparse.to_input_major(w).dequantize(), torch.from_numpy(gguf_dequantize(raw, qtype, cols)))


@needs_tiles
@pytest.mark.parametrize("qtype", TILED)
def test_gathered_rows_give_what_the_tiled_product_gives(qtype):
    """A plan's gathered rows (four where they lie, any ids and order) and the tiled dense product give a
    row the same numbers, bitwise; and float64's within fp32 rounding."""
    cols, rows = 320, 30
    raw = random_blocks(qtype, rows, cols, seed=7)
    w = quant.from_gguf(raw, qtype, cols)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(2))
    dense = quant.dots(quant.tile(w), x, parts=2)  # [5, 15, 2]
    idx = torch.tensor([14, 3, 3, 0, 9, 7, 12])
    got = quant.dots(w, x, idx=idx, parts=2)
    assert torch.equal(got, dense[:, idx])
    neurons = gguf_dequantize(raw, qtype, cols).reshape(15, 2, cols)[idx.numpy()].reshape(-1, cols)
    want = quantized_activations(x.numpy()) @ neurons.T
    assert np.abs(got.reshape(5, -1).double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


@needs_tiles
def test_tiling_in_place_is_the_same_layout():
    """The loader's in-place re-lay (no second copy) gives the bytes a fresh tiling gives."""
    cols, qtype = 256, TILED[0]
    raw = random_blocks(qtype, 40, cols, seed=5)
    fresh = quant.tile(quant.from_gguf(raw, qtype, cols))
    w = quant.from_gguf(raw, qtype, cols)
    in_place = quant.tile(w, in_place=True)
    assert in_place.data.data_ptr() == w.data.data_ptr() and torch.equal(in_place.data, fresh.data)
    odd = quant.tile(quant.from_gguf(raw[:37], qtype, cols), in_place=True)  # a partial tile: a new buffer
    assert np.array_equal(quant.untile(odd).data.numpy(), raw[:37])


def test_the_loader_tiles_where_the_calibration_says(tiny_checkpoint, monkeypatch):
    """Tiles where this build has the kernel and the calibration measured them faster; HOTCOLD_TILES=0 keeps
    the file's rows; either way the model's logits agree within the int8 activations' rounding."""
    from hotcold.engine.loader import load_model
    from hotcold.kernels import calibrate

    path = tiny_checkpoint("llama")
    tiled = load_model(path, quantize="q4_0")
    want = calibrate.current().tiles and quant.tiles_supported("Q4_0")
    assert all(bool(layer.attn.wqkv.tiled_rows) == want for layer in tiled.model.layers)
    monkeypatch.setenv("HOTCOLD_TILES", "0")
    rows = load_model(path, quantize="q4_0")
    assert not any(layer.attn.wqkv.tiled_rows for layer in rows.model.layers)
    ids = torch.tensor([1, 5, 9, 2, 7])
    a, b = tiled.model.forward_sequence(ids), rows.model.forward_sequence(ids)
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()  # sums in another order, then int8 re-rounding
