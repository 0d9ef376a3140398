"""Quantized hot rows for the GPU side (kernels/qrows.py, kernels/triton_ffn.py): GGUF blocks split into codes
and scales losslessly, and the gathered FFN over them (dequantized in the Triton kernels) against float64
over gguf's own dequantization: in Triton's interpreter here, on CUDA where there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases
from test_quant import gguf_dequantize, random_blocks

from hotcold import kernels
from hotcold.kernels import qrows, quant

TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def layer(qtype: str, I: int = 40, H: int = 96, seed: int = 0):
    """gate, up, down_t as QRows, and the same rows as float64 from gguf."""
    raws = [random_blocks(qtype, I, H, seed=seed + s) for s in range(3)]
    rows = [qrows.from_quant(quant.from_gguf(r, qtype, H)) for r in raws]
    return rows, [torch.from_numpy(gguf_dequantize(r, qtype, H)).double() for r in raws]


def f64_ffn(x: torch.Tensor, ref: list[torch.Tensor], idx: torch.Tensor, mask: torch.Tensor | None):
    gate, up, down_t = (w[idx] for w in ref)
    g, u = x.double() @ gate.T, x.double() @ up.T
    h = g / (1.0 + torch.exp(-g)) * u
    h = h if mask is None else h * mask
    return h, h @ down_t


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"{err:.3g} vs scale {want.abs().max().item():.3g}"


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_are_the_files_blocks(qtype):
    """Bytes moved, nothing re-rounded: gguf's values, from row-major or tiled blocks; as many bytes."""
    raw = random_blocks(qtype, 13, 128, seed=3)
    w = quant.from_gguf(raw, qtype, 128)
    rows = qrows.from_quant(w)
    assert rows.shape == (13, 128) and rows.nbytes == w.nbytes
    assert np.array_equal(rows.dequantize().numpy(), gguf_dequantize(raw, qtype, 128))
    idx = torch.tensor([12, 0, 5])
    assert np.array_equal(rows[idx].numpy(), gguf_dequantize(raw, qtype, 128)[idx.numpy()])
    if quant.tiles_supported(qtype):
        assert torch.equal(qrows.from_quant(quant.tile(w)).dequantize(), rows.dequantize())
    with pytest.raises(ValueError, match="Q4_0"):
        qrows.from_quant(quant.from_gguf(random_blocks("Q5_0", 2, 64), "Q5_0", 64))


@pytest.mark.parametrize("qtype", TYPES)
def test_cpu_dispatch_takes_quantized_rows(qtype):
    """Where no GPU runs the side, the dispatcher takes quantized rows through the reference."""
    (gate, up, down_t), ref = layer(qtype)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([39, 0, 5, 17, 22])
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    h64, y64 = f64_ffn(x, ref, idx, mask)
    close(kernels.gathered_gate_up(x, up, idx, "swiglu", gate, token_mask=mask), h64)
    close(kernels.gathered_ffn(x, up, down_t, idx, "swiglu", gate, token_mask=mask), y64)


@pytest.mark.parametrize("qtype", TYPES)
def test_dense_product_over_quantized_rows(qtype):
    """A dense matrix held as quantized rows (attention, the head on a GPU side): x . W^T over every row."""
    (_, up, _), ref = layer(qtype)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(5))
    close(kernels.quantized_linear(x, up), x.double() @ ref[1].T)
    assert up.all_ids() is up.all_ids()  # made once


def test_quantized_rows_under_the_interpreter():
    run_interpreter_cases(__file__, min_passed=21)


if INTERPRETED:
    from hotcold.kernels import triton_ffn as tri

    @pytest.mark.parametrize("qtype", TYPES)
    @pytest.mark.parametrize("B", [1, 3, 6])  # GEMV, GEMV with a mask, tl.dot
    @pytest.mark.parametrize("blocks", [(8, 32), (None, None)])  # one quantized block a step; the defaults
    def test_interp_quantized_gate_up_and_down(qtype, B, blocks):
        (gate, up, down_t), ref = layer(qtype, seed=B)
        x = torch.randn(B, 96, generator=torch.Generator().manual_seed(B))
        idx = torch.tensor([39, 0, 5, 17, 22, 3, 8])
        mask = None if B == 1 else torch.rand(B, 7, generator=torch.Generator().manual_seed(3)) > 0.3
        h64, y64 = f64_ffn(x, ref, idx, mask)
        block_k, block_h = blocks
        h = tri.gathered_gate_up(x, up, idx, "swiglu", gate, None, mask, block_k=block_k, block_h=block_h)
        close(h, h64)
        close(tri.gathered_down(h, down_t, idx, block_k=block_k, block_h=block_h), y64)

    @pytest.mark.parametrize("qtype", TYPES)
    def test_interp_dense_product(qtype):
        (_, up, _), ref = layer(qtype, seed=9)
        x = torch.randn(6, 96, generator=torch.Generator().manual_seed(6))  # the tl.dot path
        close(kernels.quantized_linear(x, up, backend="triton"), x.double() @ ref[1].T)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_quantized_rows(qtype, B):
    (gate, up, down_t), ref = layer(qtype, I=1100, H=512, seed=B)
    gate, up, down_t = (r.to("cuda") for r in (gate, up, down_t))
    x = torch.randn(B, 512, generator=torch.Generator().manual_seed(B))
    idx = torch.randperm(1100, generator=torch.Generator().manual_seed(4))[:333]
    h64, y64 = f64_ffn(x, ref, idx, None)
    y = kernels.gathered_ffn(x.cuda(), up, down_t, idx.cuda(), "swiglu", gate)
    close(y, y64, 1e-4)
    close(kernels.quantized_linear(x.cuda(), up), x.double() @ ref[1].T, 1e-4)  # a dense product over them
