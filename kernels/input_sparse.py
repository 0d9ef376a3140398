"""Input-sparse products (TEAL): y = W x with the inputs |x_k| <= threshold dropped, reading only the weight
columns of the inputs that survive. The matrix is stored once, input-major, so that an input's weights for
every output are one contiguous row:
- `InputMajor`: a quantized matrix's GGUF codes, scales and minimums rearranged (no re-quantization, no second
  copy), run by kernels/tsparse.c on the CPU;
- `FloatInputMajor`: a float matrix as W^T, run by the gathered axpy of kernels.gathered_down (native on the
  CPU, Triton on CUDA: the GPU side's kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native
from .quant import (
    NATIVE_TYPES,
    SPLIT_TYPES,
    QuantTensor,
    Stored,
    _lib,
    activate,
    dots,
    pack4,
    rms_norm,
    split_blocks,
    split_values,
    unpack4,
    untile,
)

TYPES = SPLIT_TYPES  # the formats whose blocks rearrange losslessly (quant.c's other types: not yet)


@dataclass
class InputMajor(Stored):
    """W [rows, cols] of a Q4_0/Q4_1/Q8_0 QuantTensor, input-major: `codes` uint8 [cols, rows / 2] (4-bit:
    per 32 outputs 16 bytes, low nibbles outputs 0-15, high 16-31, as in a GGUF block) or [cols, rows]
    (Q8_0, int8); `scales` and `mins` (Q4_1 only) the blocks' fp16 d and m, [cols / 32, rows]."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    qtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[1], self.codes.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.mins) if t is not None]

    def dequantize(self) -> torch.Tensor:
        """fp32 W [rows, cols] (for tests and references)."""
        per_weight = lambda t: None if t is None else t.repeat_interleave(32, dim=0)  # noqa: E731
        return split_values(self.codes, per_weight(self.scales), per_weight(self.mins), self.qtype).T.contiguous()


@dataclass
class FloatInputMajor(Stored):
    """A float W [rows, cols] as `weight_t` [cols, rows], contiguous: input k's weights are row k."""

    weight_t: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight_t.shape[1], self.weight_t.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight_t]


def float_linear(x: torch.Tensor, w: FloatInputMajor, threshold: float, backend: str = "auto") -> torch.Tensor:
    """fp32 [T, rows] = W . keep(x): the rows of W^T of the inputs some token keeps, each scaled by the
    token's input (0 where that token drops it). `backend` as kernels.gathered_down's."""
    from . import gathered_down

    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features; the weight has {w.shape[1]}")
    keep = x.abs() > threshold
    idx = keep.any(0).nonzero().squeeze(1)
    return gathered_down((x * keep).index_select(1, idx), w.weight_t, idx, backend=backend)


def supported(w: object) -> bool:
    """Whether `w` can be stored input-major: a Q4_0/Q4_1/Q8_0 QuantTensor whose outputs come in 32s."""
    return isinstance(w, QuantTensor) and w.qtype in TYPES and w.shape[0] % 32 == 0


def to_input_major(w: QuantTensor) -> InputMajor:
    """The same numbers input-major (see InputMajor): a lossless rearrangement of the GGUF blocks."""
    if not supported(w):
        raise ValueError(f"input-major storage takes {', '.join(TYPES)} matrices with a multiple of 32 rows; "
                         f"got {w.qtype if isinstance(w, QuantTensor) else type(w).__name__} {tuple(w.shape)}")
    rows, cols = w.shape
    w = untile(w)
    block = w.row_bytes // (cols // 32)
    codes = torch.empty(cols, rows if w.qtype == "Q8_0" else rows // 2, dtype=torch.uint8)
    scales = torch.empty(cols // 32, rows, dtype=torch.float16)
    mins = torch.empty(cols // 32, rows, dtype=torch.float16) if w.qtype == "Q4_1" else None
    for c in range(0, cols, 1024):  # in slices of 1024 inputs (whole blocks): no whole-matrix temporaries
        n = min(1024, cols - c)
        part = QuantTensor(w.data[:, c // 32 * block: (c + n) // 32 * block].contiguous(), w.qtype, n)
        c_part, s_part, m_part = split_blocks(part)
        scales[c // 32: (c + n) // 32] = s_part.T
        if mins is not None:
            mins[c // 32: (c + n) // 32] = m_part.T
        # the raw int8 bytes, or 4-bit values repacked along the outputs
        codes[c: c + n] = c_part.view(torch.uint8).T if w.qtype == "Q8_0" else pack4(unpack4(c_part).T.contiguous())
    native.use_huge_pages(codes)  # kept rows are gathered: a TLB walk each on 4 KiB pages
    return InputMajor(codes, scales, mins, w.qtype)


def linear(x: torch.Tensor, w: InputMajor, threshold: float, norm: torch.Tensor | None = None, eps: float = 0.0,
           sparse_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [T, rows] = W . keep(rmsnorm(x)) (no norm unless given): token t keeps the inputs with
    |x| > threshold when sparse_tokens[t] (default: every token sparse), every nonzero input otherwise."""
    rows, cols = w.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features; the weight has {cols}")
    x = (x.float() if norm is None else rms_norm(x, norm.float(), eps)).contiguous()
    if sparse_tokens is not None:
        sparse_tokens = sparse_tokens.to(torch.uint8).contiguous()
        if sparse_tokens.numel() != x.shape[0]:
            raise ValueError(f"sparse_tokens has {sparse_tokens.numel()} entries for {x.shape[0]} tokens")
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    status = _lib().tsparse_linear(w.codes.data_ptr(), w.scales.data_ptr(),
                                   None if w.mins is None else w.mins.data_ptr(), NATIVE_TYPES[w.qtype], rows, cols,
                                   x.data_ptr(), x.shape[0], threshold,
                                   None if sparse_tokens is None else sparse_tokens.data_ptr(), y.data_ptr())
    if status:
        raise ValueError("input-major product failed: " + ("out of memory" if status == -3 else "bad layout"))
    return y


def sparse_ffn(x: torch.Tensor, gate_up: QuantTensor, down: InputMajor, parts: int, idx: torch.Tensor,
               gate_fn: int, up_fn: int, mask: torch.Tensor | None = None,
               gate_up_bias: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
               threshold: float = 0.0) -> torch.Tensor:
    """quant.sparse_ffn's FFN (the neurons idx only, zero where mask [T, K] is False) with down kept as the
    file stores it, input-major: an active neuron's down weights are its input row, read without the second
    rounding (and the second copy) that a neuron-major down_t costs, and a token's inactive neurons are
    inputs it drops. fp32 y [T, H]."""
    I = gate_up.shape[0] // parts
    if down.shape[1] != I:
        raise ValueError(f"down must take {I} inputs (the FFN's neurons); it takes {down.shape[1]}")
    z = dots(gate_up, x, idx, parts, norm, eps)
    bias = None if gate_up_bias is None else gate_up_bias.float().view(I, parts)[idx.to(torch.int64)]
    h = activate(z, gate_fn, up_fn, bias, threshold)
    if mask is not None:
        if mask.shape != h.shape:
            raise ValueError(f"mask must be {tuple(h.shape)}; got {tuple(mask.shape)}")
        h = h.masked_fill(~mask, 0.0)
    full = torch.zeros(x.shape[0], I, dtype=torch.float32)
    full[:, idx] = h
    return linear(full, down, 0.0)
