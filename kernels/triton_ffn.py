"""Triton kernels for the GPU side of the gathered FFN (hot neurons); same signatures as kernels.reference.

gate/up: each program owns BLOCK_K active neurons x BLOCK_B tokens and walks H, loading the gathered rows
(each a contiguous run of H elements, coalesced along H) and fusing bias, activation and token mask. Small
batches use a broadcast-multiply-sum (GEMV; no wasted MMA rows), larger ones tl.dot (tensor cores).

down: y[b] = sum_k h[b,k] WdT[idx[k]] is a reduction over K, split across programs ("split-K") so that a
batch-1 decode still fills the GPU: program (h-block, split) sums its share of neurons into a private fp32
partial [S,B,H], and one torch sum adds the S partials. Chosen over atomics: the order of the additions is
fixed, so results are bit-reproducible run to run (the engine promises identical seeded generations), and
the partials are tiny next to the weights (S*B*H*4 bytes against K*H*2).

Numerics as the reference: inputs rounded to the weights' dtype, fp32 accumulation, fp32 tl.dot in IEEE
precision (no TF32). Quantized rows (kernels.qrows.QRows: Q4_0, Q4_1, Q8_0) are read as codes and scales
and dequantized in registers (`_rows`), so they cost their quantized bytes; products over them run in fp32.
Block sizes are untuned defaults (no GPU was available when this was written); every wrapper takes
overrides, and benchmarks/ffn_gpu.py --tune sweeps them.
Ids are not range-checked here (that needs a device sync): out-of-range ids read out of bounds.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .qrows import QRows
from .reference import FUNCTIONS, ActivationSpec, check_down, check_gate_up

_DOT_MIN_BATCH = 5  # batches at least this large use tl.dot (MMA tiles need >= 16 rows; pad wastes less)
_GEMV_TILE = 4096  # products per program per loop step on the GEMV path


@triton.jit
def _apply(v, FN: tl.constexpr, threshold):
    # codes: kernels.reference.FUNCTIONS; threshold: FATReLU's t (code 6)
    if FN == 1:
        v = v * tl.sigmoid(v)
    elif FN == 2:
        v = tl.maximum(v, 0.0)
    elif FN == 3:
        v = tl.maximum(v, 0.0)
        v = v * v
    elif FN == 4:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif FN == 5:  # 0.5 v (1 + tanh(z)) = v * sigmoid(2z)
        v = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif FN == 6:
        v = tl.where(v >= threshold, v, 0.0)
    return v


@triton.jit
def _mac(acc, a, b, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """acc[M,N] += a[M,R] @ b[R,N] in fp32."""
    if USE_DOT:
        if DOT_F32:  # exact products of 16-bit inputs too, so the same result as a 16-bit MMA
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _mac_t(acc, a, bt, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """acc[M,N] += a[M,R] @ bt[N,R]^T in fp32 (bt: gathered weight rows, contiguous along R)."""
    if USE_DOT:
        acc = _mac(acc, a, tl.trans(bt), USE_DOT, DOT_F32)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * bt.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _rows(w_ptr, s_ptr, m_ptr, rows, mk, h0, H, stride_w, stride_s, QTYPE: tl.constexpr, ROWS: tl.constexpr,
          COLS: tl.constexpr):
    """Weights [ROWS, COLS] of the gathered rows (live where mk) at columns h0..h0+COLS (h0 a multiple of
    COLS): as stored (QTYPE 0), or dequantized in registers from kernels.qrows.QRows (GGML codes: 2 Q4_0,
    3 Q4_1, 8 Q8_0) exactly as GGML does, fp32. Quantized rows are read as runs of code bytes and one scale
    per block (vector loads), spread over the block's weights in registers."""
    # one return: compiled Triton needs every return of a function to have one type, even one that a
    # constexpr branch leaves unreachable (the interpreter does not check)
    if QTYPE == 0:
        offs_h = h0 + tl.arange(0, COLS)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_h[None, :], mask=mk[:, None] & (offs_h < H)[None, :],
                    other=0.0)
    else:
        G: tl.constexpr = COLS // 32  # blocks of 32 weights (quantized rows hold whole blocks: H % 32 == 0)
        g = h0 // 32 + tl.arange(0, G)
        gmask = mk[:, None] & (g < H // 32)[None, :]
        d = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        if QTYPE == 8:
            offs_h = h0 + tl.arange(0, COLS)
            q = tl.load(w_ptr + rows[:, None] * stride_w + offs_h[None, :], mask=mk[:, None] & (offs_h < H)[None, :],
                        other=0).to(tl.float32)
            w = tl.reshape(tl.reshape(q, (ROWS, G, 32)) * d[:, :, None], (ROWS, COLS))
        else:  # 4-bit: byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble)
            offs_c = h0 // 2 + tl.arange(0, COLS // 2)
            c = tl.load(w_ptr + rows[:, None] * stride_w + offs_c[None, :],
                        mask=mk[:, None] & (offs_c < H // 2)[None, :], other=0).to(tl.int32)
            lo = tl.reshape((c & 0xF).to(tl.float32), (ROWS, G, 16))
            hi = tl.reshape((c >> 4).to(tl.float32), (ROWS, G, 16))
            q = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))  # [ROWS, G, 2, 16]: each block's weights in order
            if QTYPE == 2:
                w = (q - 8.0) * d[:, :, None, None]
            else:
                m = tl.load(m_ptr + rows[:, None] * stride_s + g[None, :], mask=gmask, other=0.0).to(tl.float32)
                w = q * d[:, :, None, None] + m[:, :, None, None]
            w = tl.reshape(w, (ROWS, COLS))
    return w


@triton.jit
def _gate_up_kernel(
    x_ptr, wu_ptr, wg_ptr, bias_ptr, gbias_ptr, idx_ptr, mask_ptr, h_ptr, su_ptr, mu_ptr, sg_ptr, mg_ptr, count_ptr,
    B, K, H, stride_xb, stride_wu, stride_wg, stride_bu, stride_bg, stride_mb, stride_hb, stride_s, threshold,
    GATED: tl.constexpr, GATE_FN: tl.constexpr, UP_FN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, QTYPE: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    k_live = K
    h_end = H
    if HAS_COUNT:  # ids past the device-side count are padding: their h is 0, a block of them reads nothing
        k_live = tl.minimum(tl.load(count_ptr).to(tl.int32), K)
        h_end = tl.where(tl.program_id(0) * BLOCK_K < k_live, H, 0)
    mk = offs_k < k_live
    mb = offs_b < B
    rows = tl.load(idx_ptr + offs_k, mask=mk, other=0).to(tl.int64)
    acc_u = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, h_end, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        wu = _rows(wu_ptr, su_ptr, mu_ptr, rows, mk, h0, H, stride_wu, stride_s, QTYPE, BLOCK_K, BLOCK_H)
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_h[None, :],
                     mask=mb[:, None] & (offs_h < H)[None, :], other=0.0).to(wu.dtype)
        acc_u = _mac_t(acc_u, xt, wu, USE_DOT, DOT_F32)
        if GATED:
            wg = _rows(wg_ptr, sg_ptr, mg_ptr, rows, mk, h0, H, stride_wg, stride_s, QTYPE, BLOCK_K, BLOCK_H)
            acc_g = _mac_t(acc_g, xt, wg, USE_DOT, DOT_F32)
    if HAS_BIAS:
        acc_u += tl.load(bias_ptr + rows * stride_bu, mask=mk, other=0.0).to(tl.float32)[None, :]
    h = _apply(acc_u, UP_FN, threshold)
    if GATED:
        if HAS_GATE_BIAS:
            acc_g += tl.load(gbias_ptr + rows * stride_bg, mask=mk, other=0.0).to(tl.float32)[None, :]
        h = _apply(acc_g, GATE_FN, threshold) * h
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs_b[:, None] * stride_mb + offs_k[None, :],
                       mask=mb[:, None] & mk[None, :], other=0)
        h = tl.where(keep != 0, h, 0.0)
    if HAS_COUNT:
        h = tl.where(mk[None, :], h, 0.0)
    tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :], h, mask=mb[:, None] & (offs_k < K)[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, idx_ptr, part_ptr, s_ptr, m_ptr, count_ptr,
    B, K, H, k_per_split, stride_hb, stride_w, stride_ps, stride_pb, stride_s,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, HAS_COUNT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, QTYPE: tl.constexpr,
):
    h0 = tl.program_id(0) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mh = offs_h < H
    mb = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_COUNT:  # only the first `count` ids are live (unknown at launch): splits take every S-th block of
        # them, so a short live prefix still spreads over all the programs
        k_live = tl.minimum(tl.load(count_ptr).to(tl.int32), K)
        for kb in range(split, tl.cdiv(k_live, BLOCK_K), tl.num_programs(1)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            acc = _down_step(acc, h_ptr, w_ptr, s_ptr, m_ptr, idx_ptr, offs_k, offs_k < k_live, h0, H, offs_b, mb,
                             stride_hb, stride_w, stride_s, USE_DOT, DOT_F32, QTYPE, BLOCK_K, BLOCK_H)
    else:
        k_start = split * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            acc = _down_step(acc, h_ptr, w_ptr, s_ptr, m_ptr, idx_ptr, offs_k, offs_k < k_end, h0, H, offs_b, mb,
                             stride_hb, stride_w, stride_s, USE_DOT, DOT_F32, QTYPE, BLOCK_K, BLOCK_H)
    tl.store(part_ptr + split * stride_ps + offs_b[:, None] * stride_pb + offs_h[None, :], acc,
             mask=mb[:, None] & mh[None, :])


@triton.jit
def _down_step(acc, h_ptr, w_ptr, s_ptr, m_ptr, idx_ptr, offs_k, mk, h0, H, offs_b, mb, stride_hb, stride_w,
               stride_s, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, QTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """acc += h[offs_b, offs_k] @ rows idx[offs_k] of down_t (columns h0..h0+BLOCK_H)."""
    rows = tl.load(idx_ptr + offs_k, mask=mk, other=0).to(tl.int64)
    w = _rows(w_ptr, s_ptr, m_ptr, rows, mk, h0, H, stride_w, stride_s, QTYPE, BLOCK_K, BLOCK_H)
    ht = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :],
                 mask=mb[:, None] & mk[None, :], other=0.0).to(w.dtype)
    return _mac(acc, ht, w, USE_DOT, DOT_F32)


def _block_b(B: int) -> tuple[int, bool]:
    """(BLOCK_B, use tl.dot) for a batch of B tokens."""
    if B < _DOT_MIN_BATCH:
        return triton.next_power_of_2(B), False
    return min(64, max(16, triton.next_power_of_2(B))), True


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to prove the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_f32(w: torch.Tensor | QRows) -> bool:
    """fp32 (IEEE) tl.dot for fp32 weights, and in the interpreter, whose 16-bit tl.dot multiplies the raw
    bfloat16 bit patterns (triton-lang/triton#11584, unsupported upstream)."""
    return w.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewer programs run faster


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton uses the current device), nothing to do in the interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_contiguous(w: torch.Tensor | QRows) -> torch.Tensor | QRows:
    return w if isinstance(w, QRows) or w.stride(-1) == 1 else w.contiguous()


def _parts(w: torch.Tensor | QRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(codes or weights, scales, mins, row stride, scale-row stride) as the kernels take them, and the type."""
    if not isinstance(w, QRows):
        return w, w, w, w.stride(0), 0
    return w.codes, w.scales, w.mins if w.mins is not None else w.scales, w.codes.stride(0), w.scales.stride(0)


def _whole_blocks(w: torch.Tensor | QRows, block_h: int) -> int:
    """block_h, checked: a power of two (a Triton block), and over quantized rows whole blocks of 32 weights."""
    least = 32 if isinstance(w, QRows) else 1
    if block_h < least or block_h & (block_h - 1):
        raise ValueError(f"block_h must be a power of two, at least {least} over these rows; got {block_h}")
    return block_h


def _qtype(w: torch.Tensor | QRows) -> int:
    return {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}[w.qtype] if isinstance(w, QRows) else 0


def gathered_gate_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    *,
    block_k: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    gate_bias: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 h [B,K] (kernels.reference.gathered_gate_up), one fused kernel for gate, up, bias, act, mask;
    `count` (a device tensor): only the first count[0] ids are live, read by the kernel (no host sync)."""
    spec = check_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, gate_bias, count)
    B, K, H = x.shape[0], idx.numel(), x.shape[1]
    h = _empty((B, K), torch.float32, x.device)
    if B == 0 or K == 0:
        return h
    x, idx, w_up = x.contiguous(), idx.contiguous(), _rows_contiguous(w_up)
    w_gate = _rows_contiguous(w_gate) if spec.gated else w_up
    block_b, use_dot = _block_b(B)
    if block_k is None:  # GEMV: enough programs to cover the SMs twice, 4 to 16 neurons each; with a count,
        # the live ids are an unknown prefix of K: the fewest per program, so a short prefix still fills the SMs
        live = K if count is None else 0
        block_k = 16 if use_dot else max(4, min(16, triton.next_power_of_2(live // (2 * _num_sms(x.device)) or 1)))
    # GEMV: ~4096 products per program per step (8 KB of bf16 rows in flight), within register budget
    block_h = _whole_blocks(w_up, block_h or (64 if use_dot else min(1024, max(32, _GEMV_TILE // (block_b * block_k)))))
    mask = token_mask.contiguous().view(torch.uint8) if token_mask is not None else h
    # biases are read through their stride: the executor passes the interleaved views gate_up_bias[:, 1] and
    # [:, 0] (stride 2), and copying them per call would cost a launch per layer per step
    stride_bu = up_bias.stride(0) if up_bias is not None else 0
    stride_bg = gate_bias.stride(0) if gate_bias is not None else 0
    grid = (triton.cdiv(K, block_k), triton.cdiv(B, block_b))
    (wu, su, mu, stride_wu, stride_s), (wg, sg, mg, stride_wg, _) = _parts(w_up), _parts(w_gate)
    if _qtype(w_gate) != _qtype(w_up):
        raise ValueError("w_gate and w_up must be stored alike (both quantized the same way, or both not)")
    with _on(x.device):
        _gate_up_kernel[grid](
            x, wu, wg, up_bias if up_bias is not None else h,
            gate_bias if gate_bias is not None else h, idx, mask, h, su, mu, sg, mg,
            count if count is not None else idx,
            B, K, H, x.stride(0), stride_wu, stride_wg, stride_bu, stride_bg, mask.stride(0),
            h.stride(0), stride_s,
            float(spec.threshold),
            GATED=spec.gated, GATE_FN=FUNCTIONS[spec.gate_fn], UP_FN=FUNCTIONS[spec.up_fn],
            HAS_BIAS=up_bias is not None, HAS_GATE_BIAS=gate_bias is not None, HAS_MASK=token_mask is not None,
            HAS_COUNT=count is not None, USE_DOT=use_dot,
            DOT_F32=_dot_f32(w_up), BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_H=block_h, QTYPE=_qtype(w_up),
            num_warps=num_warps or 4,
        )
    return h


def gathered_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    *,
    block_k: int | None = None,
    block_h: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B,H] in out_dtype (kernels.reference.gathered_down): split-K over the active rows (the first
    count[0] of them when `count` is given)."""
    check_down(h, w_down_t, idx, count)
    B, K = h.shape
    H = w_down_t.shape[1]
    if B == 0 or K == 0:
        return torch.zeros(B, H, dtype=out_dtype, device=h.device)
    h, idx, w_down_t = h.contiguous(), idx.contiguous(), _rows_contiguous(w_down_t)
    block_b, use_dot = _block_b(B)
    block_k = block_k or (32 if use_dot else 16)
    block_h = _whole_blocks(w_down_t, block_h or (64 if use_dot else max(32, _GEMV_TILE // (block_b * block_k))))
    h_blocks, b_blocks, k_blocks = triton.cdiv(H, block_h), triton.cdiv(B, block_b), triton.cdiv(K, block_k)
    if splits is None:  # about 4 programs per SM
        splits = max(1, (4 * _num_sms(h.device)) // (h_blocks * b_blocks))
    k_per_split = triton.cdiv(k_blocks, min(splits, k_blocks)) * block_k
    splits = triton.cdiv(K, k_per_split)
    part = _empty((splits, B, H), torch.float32, h.device)
    w, sc, mn, stride_w, stride_s = _parts(w_down_t)
    with _on(h.device):
        _down_kernel[(h_blocks, splits, b_blocks)](
            h, w, idx, part, sc, mn, count if count is not None else idx,
            B, K, H, k_per_split, h.stride(0), stride_w, part.stride(0), part.stride(1), stride_s,
            USE_DOT=use_dot, DOT_F32=_dot_f32(w_down_t), HAS_COUNT=count is not None,
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_H=block_h, QTYPE=_qtype(w_down_t), num_warps=num_warps or 4,
        )
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(out_dtype)
