"""Input-sparse products (TEAL) over quantized weights stored input-major (kernels/tsparse.c).

y = W x, where the inputs with |x_k| <= threshold are dropped, reads only the weight columns of the inputs
that survive. GGUF rows run along the inputs, so the matrix is stored once, input-major: `InputMajor` holds
the same codes, scales and minimums as the GGUF blocks (no re-quantization, no second copy), rearranged so
that one input's codes for every output are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import NATIVE_TYPES, QuantTensor, _lib, rms_norm

TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the formats whose blocks rearrange losslessly (quant.c's other types: not yet)


PIECE = 1 << 62  # outputs per panel (row-major W^T: one panel; see tsparse.c)


@dataclass
class InputMajor:
    """W [rows, cols] of a Q4_0/Q4_1/Q8_0 QuantTensor, input-major and piece-major: for each piece of 128
    outputs (the last one may be narrower), `codes` holds every input's codes for those outputs
    ([cols, width / 2] 4-bit: per 32 outputs 16 bytes, low nibbles outputs 0-15, high 16-31; [cols, width]
    int8 for Q8_0), and `scales` / `mins` (Q4_1 only) the blocks' fp16 d and m ([cols / 32, width]), pieces
    one after the other (flat tensors). A piece's bytes are one contiguous stream. `threshold`: inputs with
    |x| <= threshold are skipped by tokens that run sparse (0: every nonzero input is kept)."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    qtype: str
    rows: int
    cols: int
    threshold: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """fp32 W [rows, cols] (for tests and references)."""
        q = _unpieces(self.codes, self.cols, self.rows, 16 if self.qtype != "Q8_0" else 32)
        if self.qtype == "Q8_0":
            q = q.view(torch.int8).float()
        else:
            q = _unpack4(q).float()
        d = _unpieces(self.scales.view(torch.uint8), self.cols // 32, self.rows, 64).view(torch.float16).float()
        d = d.repeat_interleave(32, dim=0)
        if self.qtype == "Q4_1":
            m = _unpieces(self.mins.view(torch.uint8), self.cols // 32, self.rows, 64).view(torch.float16).float()
            m = m.repeat_interleave(32, dim=0)
        else:
            m = -8.0 * d if self.qtype == "Q4_0" else torch.zeros_like(d)
        return (d * q + m).T.contiguous()


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [n, w] (w a multiple of 32) as bytes [n, w / 2], GGUF's nibble order per 32."""
    q = q.reshape(q.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _unpack4(c: torch.Tensor) -> torch.Tensor:
    c = c.reshape(c.shape[0], -1, 16)
    return torch.cat([c & 0xF, c >> 4], dim=-1).reshape(c.shape[0], -1)


def _pieces(t: torch.Tensor, per32: int, pack: bool = False) -> torch.Tensor:
    """[n, rows] -> the flat piece-major bytes: for each piece of 128 columns, all n rows of it."""
    parts = []
    for p in range(0, t.shape[1], PIECE):
        chunk = t[:, p: p + PIECE]
        parts.append((_pack4(chunk) if pack else chunk).contiguous().view(torch.uint8).reshape(-1))
    return torch.cat(parts)


def _unpieces(flat: torch.Tensor, n: int, rows: int, per32: int) -> torch.Tensor:
    """The inverse of _pieces: bytes [n, rows / 32 * per32]."""
    out, at = [], 0
    for p in range(0, rows, PIECE):
        width = min(PIECE, rows - p) // 32 * per32
        out.append(flat[at: at + n * width].view(n, width))
        at += n * width
    return torch.cat(out, dim=1)


def supported(w: object) -> bool:
    """Whether `w` can be stored input-major: a Q4_0/Q4_1/Q8_0 QuantTensor whose outputs come in 32s."""
    return isinstance(w, QuantTensor) and w.qtype in TYPES and w.shape[0] % 32 == 0


def to_input_major(w: QuantTensor, threshold: float = 0.0) -> InputMajor:
    """The same numbers input-major (see InputMajor): a lossless rearrangement of the GGUF blocks."""
    if not supported(w):
        raise ValueError(f"input-major storage takes {', '.join(TYPES)} matrices with a multiple of 32 rows; "
                         f"got {w.qtype if isinstance(w, QuantTensor) else type(w).__name__} {tuple(w.shape)}")
    rows, cols = w.shape
    nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[w.qtype]
    blocks = w.data.view(rows, cols // 32, nbytes)
    scales = _pieces(blocks[..., 0:2].contiguous().view(torch.float16).view(rows, -1).T, 1)
    mins = _pieces(blocks[..., 2:4].contiguous().view(torch.float16).view(rows, -1).T, 1) if (
        w.qtype == "Q4_1") else None
    qs = blocks[..., nbytes - (32 if w.qtype == "Q8_0" else 16):]
    if w.qtype == "Q8_0":
        codes = _pieces(qs.reshape(rows, cols).T, 32)  # raw int8 bytes
    else:
        codes = _pieces(_unpack4(qs.reshape(rows * cols // 32, 16)).reshape(rows, cols).T, 16, pack=True)
    return InputMajor(codes, scales.view(torch.float16), None if mins is None else mins.view(torch.float16),
                      w.qtype, rows, cols, threshold)


def linear(x: torch.Tensor, w: InputMajor, norm: torch.Tensor | None = None, eps: float = 0.0,
           sparse_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [T, rows] = W . keep(rmsnorm(x)) (no norm unless given): token t keeps the inputs above
    w.threshold when sparse_tokens[t] (default: every token sparse), every nonzero input otherwise."""
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
                                   x.data_ptr(), x.shape[0], w.threshold,
                                   None if sparse_tokens is None else sparse_tokens.data_ptr(), y.data_ptr())
    if status:
        raise ValueError("input-major product failed: " + ("out of memory" if status == -3 else "bad layout"))
    return y
