"""Quantized weights kept in GGUF's blocks (kernels/quant.c, formats.c): the type, its products, its conversions.

A `QuantTensor` is a matrix [rows, cols] stored as GGUF stores it: each row a run of blocks along the input
dimension, so one row (one output, or one neuron) is contiguous. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K
run natively; `to_runnable` turns any other GGUF type (Q6_K, Q2_K, Q3_K, IQ*) into Q8_0 once, at load.
Products quantize the activations per 32 values to int8 and use integer dot products (as llama.cpp);
past the calibrated token count (kernels.calibrate) they dequantize tiles of rows and let torch's GEMM run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import native

# GGML type codes (gguf.GGMLQuantizationType) of the formats quant.c runs.
NATIVE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13}
QUANTIZE_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # what quant_quantize writes (--quantize)
_BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q4_K": (256, 144), "Q5_K": (256, 176)}
TILE_BYTES = 1 << 20  # fp32 rows dequantized per torch product in the large-batch path


@dataclass
class QuantTensor:
    """Rows of GGUF blocks: `data` uint8 [rows, row_bytes] holding `cols` weights per row, of type `qtype`;
    or, with `tiled_rows` set (that many rows), the same blocks in kernels/tiles.c's tiles of four rows,
    [ceil(rows / 4), 4 * row_bytes]: what the dense products read fastest (`tile`; `untile` undoes it)."""

    data: torch.Tensor
    qtype: str
    cols: int
    tiled_rows: int = 0

    def __post_init__(self) -> None:
        if self.qtype not in NATIVE_TYPES:
            raise ValueError(f"quantized type {self.qtype} is not run natively (convert with to_runnable)")
        block, nbytes = _BLOCK[self.qtype]
        width = self.cols // block * nbytes * (4 if self.tiled_rows else 1)
        if self.cols % block or self.data.dtype != torch.uint8 or self.data.dim() != 2 or (
                self.data.shape[1] != width) or (self.tiled_rows and self.data.shape[0] != -(-self.tiled_rows // 4)):
            raise ValueError(f"{self.qtype} rows of {self.cols} weights need {self.cols // block * nbytes} bytes "
                             f"in blocks of {block}; got {tuple(self.data.shape)} {self.data.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tiled_rows or self.data.shape[0], self.cols)

    @property
    def row_bytes(self) -> int:
        block, nbytes = _BLOCK[self.qtype]
        return self.cols // block * nbytes

    @property
    def code(self) -> int:
        """The type code quant.c takes (with its TILED bit for tiles)."""
        return NATIVE_TYPES[self.qtype] | (TILED if self.tiled_rows else 0)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, idx: torch.Tensor) -> QuantTensor:
        if self.tiled_rows:
            return untile(self, idx)
        return QuantTensor(self.data.index_select(0, idx.to(self.data.device)).contiguous(), self.qtype, self.cols)

    def dequantize(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [K, cols]: rows idx (default all), exactly as GGML dequantizes them."""
        return dequantize_rows(self, idx)


TILED = 256  # native.h's bit for a tiled matrix's type code


def tiles_supported(qtype: str) -> bool:
    """Whether this machine's build multiplies tiles of `qtype` (Q4_0/Q4_1 where AVX-512 VNNI runs)."""
    lib = native.load()
    return lib is not None and qtype in NATIVE_TYPES and bool(lib.tiles_supported(NATIVE_TYPES[qtype]))


def tile(w: QuantTensor, in_place: bool = False) -> QuantTensor:
    """The same blocks in tiles of four rows (kernels/tiles.c; lossless): one sequential stream for the
    four-row kernel. Only where `tiles_supported`. `in_place` re-lays w's own bytes where its row count
    allows (a multiple of 4; no second copy at load): w must not be used afterwards."""
    if w.tiled_rows:
        return w
    rows = w.shape[0]
    out = w.data.view(rows // 4, 4 * w.row_bytes) if in_place and rows % 4 == 0 and w.data.is_contiguous() else (
        torch.empty(-(-rows // 4), 4 * w.row_bytes, dtype=torch.uint8))
    if not tiles_supported(w.qtype) or _lib().quant_tile(w.data.data_ptr(), NATIVE_TYPES[w.qtype], rows, w.cols,
                                                         out.data_ptr()):
        raise ValueError(f"{w.qtype} matrices are not tiled on this machine")
    return QuantTensor(out, w.qtype, w.cols, tiled_rows=rows)


def untile(w: QuantTensor, idx: torch.Tensor | None = None, in_place: bool = False) -> QuantTensor:
    """Row-major blocks again (rows idx, default all): for what gathers rows or rearranges them. `in_place`
    re-lays w's own bytes where it can (all rows, a multiple of 4): w must not be used afterwards."""
    if not w.tiled_rows:
        return w if idx is None else w.rows(idx)
    if idx is not None:
        idx = idx.to(torch.int64).contiguous()
    K = w.tiled_rows if idx is None else idx.numel()
    in_place = in_place and idx is None and K % 4 == 0 and w.data.is_contiguous()
    out = w.data.view(K, w.row_bytes) if in_place else torch.empty(K, w.row_bytes, dtype=torch.uint8)
    status = _lib().quant_untile(w.data.data_ptr(), NATIVE_TYPES[w.qtype], w.tiled_rows, w.cols,
                                 None if idx is None else idx.data_ptr(), K, out.data_ptr())
    _check(status, idx, w.tiled_rows)
    return QuantTensor(out, w.qtype, w.cols)


SPLIT_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the formats whose blocks are a scale (and minimum) and plain codes


def split_blocks(w: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q4_0/Q4_1/Q8_0 matrix's blocks taken apart, bytes moved and nothing re-rounded: codes [rows, cols/2]
    uint8 (per 32 weights 16 bytes, low nibbles weights 0-15, high 16-31, as in the block) or [rows, cols]
    int8 (Q8_0), fp16 scales [rows, cols/32], and fp16 minimums (Q4_1; else None)."""
    if w.qtype not in SPLIT_TYPES:
        raise ValueError(f"takes {', '.join(SPLIT_TYPES)} blocks; got {w.qtype}")
    w = untile(w)
    rows, cols = w.shape
    blocks = w.data.view(rows, cols // 32, _BLOCK[w.qtype][1])
    scales = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows, cols // 32)
    mins = blocks[..., 2:4].contiguous().view(torch.float16).reshape(rows, cols // 32) if w.qtype == "Q4_1" else None
    codes = blocks[..., 4 if w.qtype == "Q4_1" else 2:].contiguous().reshape(rows, -1)
    return (codes.view(torch.int8) if w.qtype == "Q8_0" else codes), scales, mins


def pack4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [n, w] (w a multiple of 32) as bytes [n, w / 2], GGUF's nibble order per 32 (low nibbles
    values 0-15, high 16-31)."""
    q = q.reshape(q.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack4(c: torch.Tensor) -> torch.Tensor:
    """The inverse of pack4: bytes [n, w / 2] -> values [n, w]."""
    c = c.reshape(c.shape[0], -1, 16)
    return torch.cat([c & 0xF, c >> 4], dim=-1).reshape(c.shape[0], -1)


def split_values(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, qtype: str) -> torch.Tensor:
    """fp32 weights from split_blocks' parts, d and m already one per weight: as GGML dequantizes (Q4_0
    d * (q - 8), Q4_1 d * q + m, Q8_0 d * q); codes as split_blocks gives them along the last dimension."""
    q = codes.view(torch.int8).float() if qtype == "Q8_0" else unpack4(codes).float()
    d = d.float()
    if qtype == "Q4_0":
        return (q - 8.0) * d
    return q * d + m.float() if qtype == "Q4_1" else q * d


class Stored:
    """What a matrix held as several tensors answers: its device and the bytes it holds."""

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _row_major(w: QuantTensor, what: str) -> None:
    if w.tiled_rows:
        raise ValueError(f"{what} reads row-major blocks; this matrix is tiled (quant.untile it first)")


def _lib():
    lib = native.load()
    if lib is None:
        raise RuntimeError("quantized weights need the native kernels (a C compiler; HOTCOLD_NATIVE unset)")
    return lib


def dequantize_rows(w: QuantTensor, idx: torch.Tensor | None = None, start: int = 0, stop: int | None = None
                    ) -> torch.Tensor:
    lib = _lib()
    data, rows = w.data, w.shape[0]
    if idx is None and (start or stop is not None):
        if w.tiled_rows:
            idx = torch.arange(start, rows if stop is None else stop)
        else:
            data = data[start:stop]
            rows = data.shape[0]
    if idx is not None:
        idx = idx.to(torch.int64).contiguous()
    K = rows if idx is None else idx.numel()
    out = torch.empty(K, w.cols, dtype=torch.float32)
    status = lib.quant_dequantize(data.data_ptr(), w.code, rows, w.row_bytes, w.cols,
                                  None if idx is None else idx.data_ptr(), K, out.data_ptr())
    _check(status, idx, rows)
    return out


def dots(w: QuantTensor, x: torch.Tensor, idx: torch.Tensor | None = None, parts: int = 1,
         norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """fp32 [B, K, parts]: rows (idx[k] or k) * parts + p of w dotted with x [B, cols] (activations quantized
    per 32 to int8, integer dot products), x RMS-normed first (times `norm`, fp32) when `norm` is given."""
    lib = _lib()
    x = x.float().contiguous()
    B = x.shape[0]
    if x.shape[-1] != w.cols:
        raise ValueError(f"input has {x.shape[-1]} features; the weight has {w.cols}")
    n_rows = w.shape[0] // parts
    if idx is not None:
        _row_major(w, "a product over chosen rows")
        idx = idx.to(torch.int64).contiguous()
    K = n_rows if idx is None else idx.numel()
    out = torch.empty(B, K, parts, dtype=torch.float32)
    xq = torch.empty(B * (w.cols // 32) * 40, dtype=torch.uint8)
    status = lib.quant_dots(w.data.data_ptr(), w.code, n_rows, w.row_bytes, w.cols, parts,
                            None if idx is None else idx.data_ptr(), K, x.data_ptr(), B,
                            None if norm is None else norm.data_ptr(), eps, xq.data_ptr(), out.data_ptr())
    _check(status, idx, n_rows)
    return out


def _native_tokens() -> int:
    from . import calibrate

    return calibrate.max_native_tokens("quant")


def rms_norm(x: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """What the native kernels compute before a product when given a norm: x * rsqrt(mean(x^2) + eps) * norm."""
    x = x.float()
    return norm * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))


def linear(x: torch.Tensor, w: QuantTensor, max_native_tokens: int | None = None, norm: torch.Tensor | None = None,
           eps: float = 0.0) -> torch.Tensor:
    """fp32 [T, rows] = rmsnorm(x) @ w.T (no norm unless `norm` is given): integer dot products up to
    `max_native_tokens` tokens (the calibrated crossover by default), tiles of dequantized rows through
    torch's GEMM beyond."""
    if x.shape[0] <= (_native_tokens() if max_native_tokens is None else max_native_tokens):
        return dots(w, x, norm=norm, eps=eps)[..., 0]
    x = x.float() if norm is None else rms_norm(x, norm, eps)
    rows = max(16, TILE_BYTES // (4 * w.cols))
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    for s in range(0, w.shape[0], rows):
        e = min(w.shape[0], s + rows)
        torch.mm(x, dequantize_rows(w, start=s, stop=e).T, out=out[:, s:e])
    return out


def activate(z: torch.Tensor, gate_fn: int, up_fn: int, gate_up_bias: torch.Tensor | None = None,
             threshold: float = 0.0) -> torch.Tensor:
    """h [.., I] = gate_fn(z[..., 0]) * up_fn(z[..., -1]) from gate/up products z [.., I, parts] (parts 1: up
    alone), biases fp32 [I * parts] added first: what the native FFN calls compute between their products."""
    from .reference import apply_fn, code_name

    if gate_up_bias is not None:
        z = z + gate_up_bias.view(z.shape[-2], z.shape[-1])
    h = apply_fn(code_name(up_fn), z[..., -1], threshold)
    if z.shape[-1] == 2:
        h = apply_fn(code_name(gate_fn), z[..., 0], threshold) * h
    return h


def ffn(x: torch.Tensor, gate_up: QuantTensor, down: QuantTensor, parts: int, gate_fn: int, up_fn: int,
        gate_up_bias: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
        max_native_tokens: int | None = None, threshold: float = 0.0) -> torch.Tensor:
    """fp32 y [T, H] = down . act(gate_up . rmsnorm(x)) in one native call: gate and up rows interleaved in
    gate_up [I * parts, H] (parts 2; 1: up alone), down [H, I]; activation codes kernels.reference.FUNCTIONS
    (`threshold`: FATReLU's t);
    gate_up_bias fp32 [I * parts]. Past the calibrated token count, the same through `linear`."""
    I, H = gate_up.shape[0] // parts, gate_up.cols
    if x.shape[0] > (_native_tokens() if max_native_tokens is None else max_native_tokens):
        z = linear(x, gate_up, norm=norm, eps=eps)
        return linear(activate(z.view(-1, I, parts), gate_fn, up_fn, gate_up_bias, threshold), down)
    lib = _lib()
    x = x.float().contiguous()
    B = x.shape[0]
    scratch = torch.empty(B * I * (parts + 1) + B * max(H, I) + (B * max(H, I) // 32 * 40 + 3) // 4,
                          dtype=torch.float32)
    y = torch.empty(B, down.shape[0], dtype=torch.float32)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    status = lib.quant_ffn(gate_up.data.data_ptr(), gate_up.code, gate_up.row_bytes,
                           down.data.data_ptr(), down.code, down.row_bytes, I, H, parts,
                           x.data_ptr(), B, ptr(norm), eps, ptr(gate_up_bias), gate_fn, up_fn, scratch.data_ptr(),
                           y.data_ptr(), threshold)
    _check(status, None, 0)
    return y


def axpy(w: QuantTensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fp32 y [B, cols] = sum_k h[b, k] * row idx[k] of w: the down projection of a neuron-sparse FFN over
    down_t rows, or an input-sparse product over W^T rows. Each output sums its rows in k order (whatever
    the threads); a zero h[b, k] skips the row for that token."""
    lib = _lib()
    _row_major(w, "axpy")
    idx = idx.to(torch.int64).contiguous()
    h = h.float().contiguous()
    if h.dim() != 2 or h.shape[1] != idx.numel():
        raise ValueError(f"h must be [tokens, {idx.numel()}] (one value per row id); got {tuple(h.shape)}")
    y = torch.zeros(h.shape[0], w.cols, dtype=torch.float32)
    status = lib.quant_axpy(w.data.data_ptr(), NATIVE_TYPES[w.qtype], w.data.shape[0], w.data.shape[1], w.cols,
                            idx.data_ptr(), idx.numel(), h.data_ptr(), h.shape[0], y.data_ptr())
    _check(status, idx, w.data.shape[0])
    return y


def sparse_ffn(x: torch.Tensor, gate_up: QuantTensor, down_t: QuantTensor, parts: int, idx: torch.Tensor,
               gate_fn: int, up_fn: int, mask: torch.Tensor | None = None,
               gate_up_bias: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
               threshold: float = 0.0) -> torch.Tensor:
    """fp32 y [T, H] over the neurons idx only, in one native call: h = act(gate_up rows . rmsnorm(x)) (gate
    and up interleaved, [I * parts, H]), zero where mask [T, K] (bool, per token) is False, then
    y = sum_k h[:, k] * down_t[idx[k]] (down_t [I, H]). gate_up_bias fp32 [I * parts]."""
    lib = _lib()
    _row_major(gate_up, "the sparse FFN's gathered rows")
    _row_major(down_t, "the sparse FFN's down_t")
    I, H = gate_up.shape[0] // parts, gate_up.cols
    if down_t.shape != (I, H):
        raise ValueError(f"down_t must be [{I}, {H}] (neuron-major); got {down_t.shape}")
    x = x.float().contiguous()
    idx = idx.to(torch.int64).contiguous()
    B, K = x.shape[0], idx.numel()
    if mask is not None:
        if mask.shape != (B, K):
            raise ValueError(f"mask must be [{B}, {K}]; got {tuple(mask.shape)}")
        mask = mask.to(torch.uint8).contiguous()
    scratch = torch.empty(B * K * (parts + 1) + (B * H // 32 * 40 + 3) // 4, dtype=torch.float32)
    y = torch.empty(B, H, dtype=torch.float32)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    bias = None if gate_up_bias is None else gate_up_bias.float().contiguous()
    norm = None if norm is None else norm.float().contiguous()
    status = lib.quant_sparse_ffn(gate_up.data.data_ptr(), NATIVE_TYPES[gate_up.qtype], gate_up.data.shape[1],
                                  down_t.data.data_ptr(), NATIVE_TYPES[down_t.qtype], down_t.data.shape[1], I, H,
                                  parts, idx.data_ptr(), K, x.data_ptr(), B, ptr(norm), eps, ptr(bias), ptr(mask),
                                  gate_fn, up_fn, threshold, scratch.data_ptr(), y.data_ptr())
    _check(status, idx, I)
    return y


def transpose(w: QuantTensor, qtype: str = "Q8_0") -> QuantTensor:
    """w.T re-quantized to `qtype`: GGUF's ffn_down [H, I] as the neuron-major down_t [I, H] the sparse FFN
    reads. Q8_0 by default: a second 4-bit rounding costs far more than the first (default model, 4096
    held-out tokens: Q4_1 down as Q4_1 down_t +8.4% perplexity, as Q8_0 +0.4%; benchmarks/RESULTS.md)."""
    return quantize(w.dequantize().T.contiguous(), qtype)


def quantize(t: torch.Tensor, qtype: str) -> QuantTensor:
    """A float matrix [rows, cols] in GGML's Q8_0, Q4_0 or Q4_1 blocks (its reference rounding rules)."""
    if qtype not in QUANTIZE_TYPES:
        raise ValueError(f"can quantize to {', '.join(QUANTIZE_TYPES)}, not {qtype}")
    t = t.float().contiguous()
    rows, cols = t.shape
    block, nbytes = _BLOCK[qtype]
    if cols % block:
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {block}; got {cols}")
    out = torch.empty(rows, cols // block * nbytes, dtype=torch.uint8)
    if _lib().quant_quantize(t.data_ptr(), NATIVE_TYPES[qtype], rows, cols, out.data_ptr()):
        raise ValueError(f"cannot quantize to {qtype}")
    return QuantTensor(out, qtype, cols)


def from_gguf(raw: np.ndarray, qtype: str, cols: int, copy: bool = True) -> QuantTensor:
    """A GGUF tensor's bytes ([rows, row_bytes] uint8, as gguf.GGUFReader gives them) as a QuantTensor; types
    quant.c does not run are dequantized (gguf.quants) and re-quantized to Q8_0 once. copy=False: `raw` is
    already this process's own copy, kept as it is."""
    raw = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
    if qtype in NATIVE_TYPES:
        return QuantTensor(torch.from_numpy(raw.copy() if copy else raw), qtype, cols)
    import gguf

    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return quantize(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, cols), "Q8_0")


def concat(parts: list[QuantTensor]) -> QuantTensor:
    """Rows of several matrices stacked (all of one type and width)."""
    for p in parts:
        _row_major(p, "concat")
    return QuantTensor(torch.cat([p.data for p in parts]), parts[0].qtype, parts[0].cols)


def interleave(a: QuantTensor, b: QuantTensor) -> QuantTensor:
    """Rows a0, b0, a1, b1, ...: gate and up rows of one neuron side by side (hotcold's gate_up layout)."""
    _row_major(a, "interleave")
    _row_major(b, "interleave")
    return QuantTensor(torch.stack([a.data, b.data], dim=1).reshape(-1, a.data.shape[1]).contiguous(), a.qtype,
                       a.cols)


def _check(status: int, idx: torch.Tensor | None, n_rows: int) -> None:
    if status == -2:
        raise ValueError("weight bytes do not match the quantized type's block layout")
    if status:
        raise IndexError(f"row ids must lie in [0, {n_rows}); got min {int(idx.min())}, max {int(idx.max())}")
