"""Gathered FFN on the CPU (the cold-neuron workers' compute): native kernels, else plain torch ops.

Small batches (up to the crossover kernels.calibrate measured) of fp32/bf16 weights go to kernels/gathered.c
(kernels/native.py), which streams each active row once: gate/up dot products and the down axpy, fp32
accumulation. Where it cannot be built (no C compiler, HOTCOLD_NATIVE=0), and for larger batches, the torch
path below runs. Both release the GIL. What measured fastest for the torch path on a 2-core AVX-512
machine (benchmarks/ffn_cpu.py; /work/notes/kernels.md):
- gate/up: gather the active rows in chunks that stay in cache (index_select into a reused buffer), then
  a small matmul per chunk. One big gather writes K*H bytes and reads them back, and a fresh allocation
  that large page-faults on every call. 16-bit chunks are larger: a bf16 matmul costs ~12 us per call.
- gate and up stored interleaved ([I,2,H]; pass the views packed[:, 0] and packed[:, 1]) are fetched by
  one gather of 2H-long rows: fewer row starts, 10-15% faster at the Llama-2-7B shape at 10% density.
- down, small batch: `embedding_bag(mode="sum", per_sample_weights=h)` is exactly y = sum_k h_k W[idx_k]
  and FBGEMM streams the rows with prefetching and no materialised gather: near the memory bandwidth
  (it parallelises over bags, so one token's sum is split into one bag per thread and the partials added).
  For larger batches it re-reads every row once per token, so we gather once (chunked) and matmul.
Numerics follow kernels/reference.py (inputs rounded to the weights' dtype); with 16-bit weights the
per-chunk products come out of torch's matmul in that dtype, so h and y carry its rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native
from .reference import FUNCTIONS, ActivationSpec, activation_spec, apply_fn, check_down, check_gate_up


@dataclass(frozen=True)
class CpuConfig:
    # Bytes of gathered rows per chunk (fp32, and 16-bit dtypes whose matmul has a larger call overhead).
    chunk_bytes: int = 1 << 20
    chunk_bytes_16bit: int = 4 << 20
    # Largest batch whose down projection uses embedding_bag (it re-reads every row once per token).
    ebag_max_batch: int = 8
    # Fewest rows per embedding_bag bag when one token's sum is split across threads.
    min_bag: int = 32
    # Native kernels where kernels.calibrate measured them faster than torch on this machine.
    use_native: bool = True


DEFAULT_CONFIG = CpuConfig()


def gathered_gate_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    config: CpuConfig = DEFAULT_CONFIG,
    *,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 h [B,K]: the active neurons' activations (see kernels.reference.gathered_gate_up)."""
    spec = check_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, gate_bias)
    B, K = x.shape[0], idx.numel()
    if K == 0 or B == 0:
        return torch.zeros(B, K, dtype=torch.float32, device=x.device)
    packed = _packed_view(w_gate, w_up) if spec.gated else None
    weights = (w_up,) if w_gate is None else (w_up, w_gate)
    if config.use_native and native.preferred(B, *weights):
        xf = x.to(w_up.dtype).float()
        if packed is not None:  # one pass reads each neuron's gate and up rows: [B,K,2]
            g, u = native.gathered_dots(packed, 2, idx, xf).unbind(-1)
        else:
            u = native.gathered_dots(w_up, 1, idx, xf)[..., 0]
            g = native.gathered_dots(w_gate, 1, idx, xf)[..., 0] if spec.gated else None
    else:
        xt = x.to(w_up.dtype).T
        if packed is not None:  # one gather fetches gate and up rows: [K,2,B]
            g, u = _gathered_mm(xt, packed, idx, _chunk_bytes(w_up, config)).float().unbind(1)
            g, u = g.T, u.T
        else:
            u = _gathered_mm(xt, w_up, idx, _chunk_bytes(w_up, config)).float().T
            g = _gathered_mm(xt, w_gate, idx, _chunk_bytes(w_gate, config)).float().T if spec.gated else None
    if up_bias is not None:
        u = u + up_bias.index_select(0, idx).float()
    h = apply_fn(spec.up_fn, u, spec.threshold)
    if spec.gated:
        if gate_bias is not None:
            g = g + gate_bias.index_select(0, idx).float()
        h = apply_fn(spec.gate_fn, g, spec.threshold) * h
    if token_mask is not None:
        h = h.masked_fill(~token_mask, 0.0)
    return h.contiguous()


def gathered_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    config: CpuConfig = DEFAULT_CONFIG,
    *,
    gate_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [B,H]: gathered_gate_up then gathered_down. For a few tokens with native kernels, one native call
    does both (no Python between them: ~25 us less per call, which is most of a small layer's time)."""
    spec = check_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, gate_bias)
    packed = _packed_view(w_gate, w_up) if spec.gated else None
    one_call = (config.use_native and idx.numel() and (packed is not None or not spec.gated)
                and w_down_t.dtype == w_up.dtype and w_down_t.shape == w_up.shape
                and native.preferred(x.shape[0], w_up, w_down_t))
    if not one_call:
        h = gathered_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, config, gate_bias=gate_bias)
        return gathered_down(h, w_down_t, idx, out_dtype, config)
    fp32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y = native.gathered_ffn(packed if spec.gated else w_up, 2 if spec.gated else 1, w_down_t, idx,
                            x.to(w_up.dtype).float(), FUNCTIONS[spec.gate_fn] if spec.gated else 0,
                            FUNCTIONS[spec.up_fn], fp32(up_bias), fp32(gate_bias), token_mask, spec.threshold)
    return y.to(out_dtype)


def gathered_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    config: CpuConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """y [B,H] = sum_k h[:,k] * w_down_t[idx[k]] (see kernels.reference.gathered_down)."""
    check_down(h, w_down_t, idx)
    B, K = h.shape
    H = w_down_t.shape[1]
    if K == 0 or B == 0:
        return torch.zeros(B, H, dtype=out_dtype, device=h.device)
    hw = h.to(w_down_t.dtype)
    if config.use_native and native.preferred(B, w_down_t):
        return native.gathered_axpy(w_down_t, idx, hw.float()).to(out_dtype)
    if B <= config.ebag_max_batch:
        # embedding_bag runs its bags in parallel: split each token's sum into `per` bags, one per thread
        per = max(1, min(torch.get_num_threads() // B, K // config.min_bag))
        if per == 1:
            offsets = torch.arange(0, B * K, K, dtype=idx.dtype, device=h.device)
        else:
            bag = torch.arange(B * per, dtype=idx.dtype, device=h.device)
            offsets = bag % per * K // per + bag // per * K
        ids = idx if B == 1 else idx.repeat(B)
        # torch.embedding_bag (the op) rather than F.embedding_bag: half the per-call overhead
        y = torch.embedding_bag(w_down_t, ids, offsets, False, 0, False, hw.reshape(-1), False)[0]
        return (y if per == 1 else y.view(B, per, -1).sum(1, dtype=torch.float32)).to(out_dtype)
    rows = _chunk_rows(w_down_t, _chunk_bytes(w_down_t, config))
    if K <= rows:
        return (hw @ w_down_t.index_select(0, idx)).to(out_dtype)
    y = torch.zeros(B, H, dtype=torch.float32, device=h.device)
    buf = torch.empty(rows, H, dtype=w_down_t.dtype, device=h.device)
    part = torch.empty(B, H, dtype=w_down_t.dtype, device=h.device)
    for s in range(0, K, rows):
        e = min(K, s + rows)
        w = torch.index_select(w_down_t, 0, idx[s:e], out=buf[: e - s])
        if w_down_t.dtype == torch.float32:
            y.addmm_(hw[:, s:e], w)
        else:
            y += torch.mm(hw[:, s:e], w, out=part)
    return y.to(out_dtype)


def dense_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    w_down_t: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B,H]: the dense FFN in the weights' dtype (what a dense model runs), the baseline to beat."""
    spec = activation_spec(activation)
    if w_down_t is None or spec.gated != (w_gate is not None):
        raise ValueError(f"dense_ffn needs w_down_t, and w_gate exactly when {activation!r} is gated")
    x = x.to(w_up.dtype)
    u = x @ w_up.T
    if up_bias is not None:
        u = u + up_bias
    h = apply_fn(spec.up_fn, u, spec.threshold)
    if spec.gated:
        h = apply_fn(spec.gate_fn, x @ w_gate.T, spec.threshold) * h
    y = h @ w_down_t
    return y if down_bias is None else y + down_bias


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised outputs come from here (tests poison them to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _chunk_bytes(w: torch.Tensor, config: CpuConfig) -> int:
    return config.chunk_bytes if w.element_size() >= 4 else config.chunk_bytes_16bit


def _chunk_rows(w: torch.Tensor, chunk_bytes: int) -> int:
    return max(8, chunk_bytes // max(1, w[0].numel() * w.element_size()))


def _packed_view(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor | None:
    """The [I,2,H] tensor that w_gate/w_up are the [:,0]/[:,1] views of (interleaved layout), else None."""
    base = w_up._base  # the usual case, checked in ~1 us: both are slices of one packed tensor
    if (base is not None and base is w_gate._base and base.dim() == 3 and base.shape[1] == 2
            and base.shape[0] == w_up.shape[0] and base.is_contiguous() and w_gate.data_ptr() == base.data_ptr()
            and w_up.data_ptr() == base.data_ptr() + w_up.shape[1] * w_up.element_size()):
        return base
    I, H = w_up.shape
    e = w_up.element_size()
    if (w_gate.stride() != (2 * H, 1) or w_up.stride() != (2 * H, 1) or w_gate.device != w_up.device
            or w_up.data_ptr() != w_gate.data_ptr() + H * e):
        return None
    return torch.as_strided(w_gate, (I, 2, H), (2 * H, H, 1))


def _gathered_mm(xt: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """w[idx] @ xt as [K,B] (or [K,2,B] for packed [I,2,H] w) in w's dtype, in chunks of rows."""
    K, rows = idx.numel(), _chunk_rows(w, chunk_bytes)
    if K <= rows:
        return w.index_select(0, idx) @ xt
    out = _empty((K, *w.shape[1:-1], xt.shape[1]), w.dtype, w.device)
    buf = torch.empty(rows, *w.shape[1:], dtype=w.dtype, device=w.device)
    for s in range(0, K, rows):
        e = min(K, s + rows)
        torch.matmul(torch.index_select(w, 0, idx[s:e], out=buf[: e - s]), xt, out=out[s:e])
    return out
