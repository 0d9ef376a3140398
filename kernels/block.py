"""One pre-norm transformer block over quantized weights in one native call (kernels/block.c): its weights
as the C takes them, and the call. Why one call: the Python and torch dispatch between a block's ~12 small
ops cost as much as the weights' reads on a small model."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .quant import NATIVE_TYPES, QuantTensor, _check, _lib


class _QMat(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("row_bytes", ctypes.c_int64), ("cols", ctypes.c_int64), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("threshold", ctypes.c_float)]


def _qmat(w, threshold: float) -> _QMat:
    """A QuantTensor (row-major blocks), or an input_sparse.InputMajor with the threshold of its inputs."""
    if isinstance(w, QuantTensor):
        return _QMat(w.data.data_ptr(), w.code, w.shape[0], w.row_bytes, w.cols)
    rows, cols = w.shape
    return _QMat(w.codes.data_ptr(), NATIVE_TYPES[w.qtype], rows, 0, cols, w.scales.data_ptr(),
                 None if w.mins is None else w.mins.data_ptr(), threshold)


@dataclass
class BlockWeights:
    """One pre-norm block's weights as `block` takes them (RMS norms; fused qkv; gate/up interleaved). Each
    matrix is a QuantTensor or an input_sparse.InputMajor (an input-sparse product, with its entry of
    `input_thresholds`: wqkv, wo, gate_up, down)."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    eps: float
    wqkv: QuantTensor
    bqkv: torch.Tensor | None
    wo: QuantTensor
    bo: torch.Tensor | None
    gate_up: QuantTensor | None = None  # None: the call runs attention alone (the caller runs the FFN)
    down: QuantTensor | None = None
    parts: int = 1
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_fn: int = 0
    up_fn: int = 0
    threshold: float = 0.0  # FATReLU's t
    input_thresholds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:  # the C reads these as plain fp32 arrays
        for name in ("attn_norm", "ffn_norm", "bqkv", "bo", "gate_up_bias", "down_bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.float().contiguous())
        mats = (self.wqkv, self.wo, self.gate_up, self.down)
        self._mats = [None if m is None else ctypes.byref(_qmat(m, t)) for m, t in zip(mats, self.input_thresholds)]


def block(x: torch.Tensor, w: BlockWeights, rope: tuple[torch.Tensor, torch.Tensor] | None,
          k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, token_seq: torch.Tensor,
          positions: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None,
          sparse_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] fp32 after one pre-norm transformer block, in one native call: RMS norm, qkv, rotate-half
    RoPE (cos/sin [T, head_dim]), keys/values stored into the paged fp32 caches
    [blocks, block_size, kv_heads, head_dim] at each token's position in its sequence's block table
    (tables [S, max_blocks] int64, token_seq [T]: each token's row in tables), attention of each token over
    its own sequence up to its position (within `window`), o, residual, then the FFN and its residual (not
    when w.gate_up is None). Input-major matrices drop small inputs for the tokens with sparse_tokens[t] != 0
    (uint8 [T]; None: every token). Why one call: the Python and torch dispatch between ~12 small ops per block
    cost as much as the weights' reads on a small model."""
    lib = _lib()
    x = x.float().contiguous().clone()
    T, H = x.shape
    qkv_dim, I = w.wqkv.shape[0], 0 if w.gate_up is None else w.gate_up.shape[0] // w.parts
    if sparse_tokens is not None:
        sparse_tokens = sparse_tokens.to(torch.uint8).contiguous()
    widest = max(H, I, qkv_dim, n_heads * head_dim)
    n = T * (qkv_dim + n_heads * head_dim + H + I * (w.parts + 1) + 2 * widest) + (T * widest // 32 * 40) // 4 + 64
    scratch = torch.empty(n, dtype=torch.float32)
    cos, sin = (None, None) if rope is None else (rope[0].reshape(T, head_dim).float().contiguous(),
                                                  rope[1].reshape(T, head_dim).float().contiguous())
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    tables, token_seq = tables.to(torch.int64).contiguous(), token_seq.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    block_size = k_cache.shape[1]
    m = w._mats
    status = lib.quant_block(
        x.data_ptr(), T, H, ptr(w.attn_norm), ptr(w.ffn_norm), w.eps, m[0], ptr(w.bqkv), m[1], ptr(w.bo), m[2], m[3],
        w.parts, ptr(w.gate_up_bias),
        ptr(w.down_bias), w.gate_fn, w.up_fn, ptr(cos), ptr(sin), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), token_seq.data_ptr(), positions.data_ptr(), tables.shape[1],
        block_size.bit_length() - 1, n_heads, n_kv_heads, head_dim, window or 0, scratch.data_ptr(),
        w.threshold, ptr(sparse_tokens))
    _check(status, None, 0)
    return x
