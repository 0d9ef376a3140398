"""hotcold.kernels: the gathered (sparse) FFN as pure functions over tensors; no model knowledge.

`gathered_gate_up` / `gathered_down` pick a backend: Triton for CUDA tensors (when triton is installed),
else the CPU path (plain torch, which also runs on CUDA). `backend="triton"` on CPU tensors runs the same
kernels in Triton's interpreter and needs TRITON_INTERPRET=1 set before this process first imports
hotcold.kernels.triton_ffn. triton is imported lazily: this package works without it.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from . import cpu_sparse, reference
from .cpu_sparse import CpuConfig, dense_ffn
from .qrows import QRows
from .reference import ACTIVATIONS, ActivationSpec, activation_spec

__all__ = [
    "ACTIVATIONS", "ActivationSpec", "CpuConfig", "QRows", "activation_spec", "compact", "dense_ffn", "gathered_down",
    "gathered_ffn", "gathered_gate_up", "quantized_linear", "resolve_backend", "triton_available",
]

BACKENDS = ("auto", "triton", "cpu", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The module implementing `backend` for tensors on `device` (see the package docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "cpu"
    if backend == "cpu":
        return cpu_sparse
    if backend == "reference":
        return reference
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on non-CUDA tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    from . import triton_ffn

    return triton_ffn


def _impl(backend: str, device: torch.device, *weights) -> ModuleType:
    """resolve_backend, except that quantized rows (kernels.qrows) off the Triton path take the reference:
    on the CPU they are the GPU side's rows run where no GPU is (the CPU engine's own quantized FFNs go
    through kernels.quant)."""
    impl = resolve_backend(backend, device)
    return reference if impl is cpu_sparse and any(isinstance(w, QRows) for w in weights) else impl


def compact(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, count): the positions of active's True entries first, ascending, padded with 0 to active's
    length, and how many there are (int32 [1]) — computed where `active` lives, with no host sync, so the
    kernels' `count` argument can consume them on a GPU while the host goes on."""
    n = active.numel()
    pos = torch.cumsum(active, 0)
    count = (pos[-1:] if n else torch.zeros(1, dtype=pos.dtype, device=active.device)).to(torch.int32)
    slots = torch.where(active, pos - 1, n)  # inactive ones all land in a spare slot, dropped
    ids = torch.zeros(n + 1, dtype=torch.long, device=active.device)
    ids.scatter_(0, slots, torch.arange(n, device=active.device))
    return ids[:n], count


def _sliced(impl: ModuleType, count: torch.Tensor | None, idx: torch.Tensor, token_mask: torch.Tensor | None):
    """`count` as each backend takes it: Triton reads it in its kernels; the host backends (reference, CPU)
    get the live ids alone (they run on the host: no sync to save)."""
    if count is None or impl not in (cpu_sparse, reference):
        return idx, token_mask, {} if count is None else {"count": count}
    reference.check_count(count)
    n = reference.live(idx.numel(), count)
    return idx[:n], None if token_mask is None else token_mask[:, :n], {}


def gathered_gate_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    *,
    gate_bias: torch.Tensor | None = None,
    backend: str = "auto",
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 h [B,K] = act(gate/up rows idx at x), zero where token_mask is False and past `count`
    (kernels.reference)."""
    impl = _impl(backend, x.device, w_up)
    ids, mask, kw = _sliced(impl, count, idx, token_mask)
    h = impl.gathered_gate_up(x, w_up, ids, activation, w_gate, up_bias, mask, gate_bias=gate_bias, **kw)
    return h if ids.numel() == idx.numel() else torch.nn.functional.pad(h, (0, idx.numel() - ids.numel()))


def gathered_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    *,
    gate_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B,H] = gathered_down(gathered_gate_up(...)): the FFN over the active neurons idx (the first
    count[0] of them when given; one native call on the CPU for a few tokens; the two kernels elsewhere)."""
    impl = _impl(backend, x.device, w_up, w_down_t)
    idx, token_mask, kw = _sliced(impl, count, idx, token_mask)
    if impl is cpu_sparse:
        return cpu_sparse.gathered_ffn(x, w_up, w_down_t, idx, activation, w_gate, up_bias, token_mask,
                                       gate_bias=gate_bias, out_dtype=out_dtype)
    h = impl.gathered_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, gate_bias=gate_bias, **kw)
    return impl.gathered_down(h, w_down_t, idx, out_dtype, **kw)


IDENTITY = ActivationSpec(False, "identity", "identity")


def quantized_linear(x: torch.Tensor, w: QRows, *, backend: str = "auto") -> torch.Tensor:
    """fp32 [T, rows] = x . w^T for a dense matrix held as quantized rows: the gate/up kernel over every row
    with no activation (on a GPU it reads the quantized bytes and dequantizes in registers)."""
    return gathered_gate_up(x, w, w.all_ids(), IDENTITY, backend=backend)


def gathered_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    *,
    backend: str = "auto",
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B,H] = sum_k h[:,k] * w_down_t[idx[k]] in out_dtype, fp32 accumulation, k < count (kernels.reference)."""
    impl = _impl(backend, h.device, w_down_t)
    ids, _, kw = _sliced(impl, count, idx, None)
    return impl.gathered_down(h[:, : ids.numel()], w_down_t, ids, out_dtype, **kw)
