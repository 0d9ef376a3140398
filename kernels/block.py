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


class StepInputs:
    """What every block of one step reads, made once per step rather than once per layer (each is a torch op
    or two: 30 layers of them took 7% of a default-model decode step, now 2%): RoPE's cos/sin [T, head_dim],
    the block tables [S, max_blocks] int64, each token's row in them and position, which tokens drop small
    inputs (uint8 [T], or None: every token), and one scratch buffer the blocks take in turn."""

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor] | None, tables: torch.Tensor,
                 token_seq: torch.Tensor, positions: torch.Tensor, head_dim: int,
                 sparse_tokens: torch.Tensor | None = None):
        T = token_seq.shape[0]
        self.cos, self.sin = (None, None) if rope is None else (rope[0].reshape(T, head_dim).float().contiguous(),
                                                                rope[1].reshape(T, head_dim).float().contiguous())
        self.tables, self.token_seq = tables.to(torch.int64).contiguous(), token_seq.to(torch.int64).contiguous()
        self.positions = positions.to(torch.int64).contiguous()
        self.sparse_tokens = None if sparse_tokens is None else sparse_tokens.to(torch.uint8).contiguous()
        self._scratch = torch.empty(0, dtype=torch.float32)

    def scratch(self, n: int) -> torch.Tensor:
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32)
        return self._scratch


def block(x: torch.Tensor, w: BlockWeights, step: StepInputs, k_cache: torch.Tensor, v_cache: torch.Tensor,
          n_heads: int, n_kv_heads: int, head_dim: int, window: int | None, in_place: bool = False) -> torch.Tensor:
    """x [T, H] fp32 after one pre-norm transformer block, in one native call: RMS norm, qkv, rotate-half
    RoPE, keys/values stored into the paged fp32 caches [blocks, block_size, kv_heads, head_dim] at each
    token's position in its sequence's block table, attention of each token over its own sequence up to its
    position (within `window`), o, residual, then the FFN and its residual (not when w.gate_up is None).
    Input-major matrices drop small inputs for step.sparse_tokens. in_place: x is the caller's to overwrite
    (the previous block's output), else it is copied. Why one call: the Python and torch dispatch between ~12
    small ops per block cost as much as the weights' reads on a small model."""
    lib = _lib()
    x = x if in_place and x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous().clone()
    T, H = x.shape
    qkv_dim, I = w.wqkv.shape[0], 0 if w.gate_up is None else w.gate_up.shape[0] // w.parts
    widest = max(H, I, qkv_dim, n_heads * head_dim)
    n = T * (qkv_dim + n_heads * head_dim + H + I * (w.parts + 1) + 2 * widest) + (T * widest // 32 * 40) // 4 + 64
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    m = w._mats
    status = lib.quant_block(
        x.data_ptr(), T, H, ptr(w.attn_norm), ptr(w.ffn_norm), w.eps, m[0], ptr(w.bqkv), m[1], ptr(w.bo), m[2], m[3],
        w.parts, ptr(w.gate_up_bias),
        ptr(w.down_bias), w.gate_fn, w.up_fn, ptr(step.cos), ptr(step.sin), k_cache.data_ptr(), v_cache.data_ptr(),
        step.tables.data_ptr(), step.token_seq.data_ptr(), step.positions.data_ptr(), step.tables.shape[1],
        k_cache.shape[1].bit_length() - 1, n_heads, n_kv_heads, head_dim, window or 0, step.scratch(n).data_ptr(),
        w.threshold, ptr(step.sparse_tokens))
    _check(status, None, 0)
    return x
