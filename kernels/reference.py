"""Torch reference for the gathered (sparse) FFN: the semantics every backend must match.

Shapes: x [B,H]; w_up, w_gate, w_down_t [I,H] (one contiguous row per neuron, down stored transposed);
idx [K] integer neuron ids (any order, no duplicates expected); token_mask [B,K] bool; count: optional
int tensor [1] on the device: only the first count[0] ids are live (ids compacted on the device, padded to
a size known at launch, so the host never waits for how many there are); the rest give h = 0 and add nothing.

Numerics, shared by all backends:
- the input of each product is first rounded to the weights' dtype (x for gate/up, h for down), as a
  dense matmul in that dtype would; products and sums are accumulated in fp32;
- `gathered_gate_up` returns fp32 h [B,K]; `gathered_down` returns y [B,H] in `out_dtype` (fp32 by
  default, so partial outputs of several devices can be added before rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Element-wise functions, by name. Codes are shared with the Triton kernels (constexpr switch) and the native
# ones (native.h act()). "fatrelu" (ProSparse, MiniCPM-S) keeps v where v >= threshold, else 0.
FUNCTIONS = {"identity": 0, "silu": 1, "relu": 2, "relu2": 3, "gelu": 4, "gelu_tanh": 5, "fatrelu": 6}


@dataclass(frozen=True)
class ActivationSpec:
    """h = gate_fn(g) * up_fn(u + b) when gated, else up_fn(u + b); `threshold` is FATReLU's t (the one
    parameter any function takes: the kernels receive it with the function codes)."""

    gated: bool
    gate_fn: str
    up_fn: str
    threshold: float = 0.0


ACTIVATIONS: dict[str, ActivationSpec] = {
    "swiglu": ActivationSpec(True, "silu", "identity"),
    "reglu": ActivationSpec(True, "relu", "identity"),
    "drelu": ActivationSpec(True, "relu", "relu"),
    "geglu": ActivationSpec(True, "gelu", "identity"),
    "geglu_tanh": ActivationSpec(True, "gelu_tanh", "identity"),
    "fatrelu": ActivationSpec(True, "fatrelu", "identity"),  # threshold: see with_threshold
    "relu": ActivationSpec(False, "identity", "relu"),
    "relu2": ActivationSpec(False, "identity", "relu2"),
    "gelu": ActivationSpec(False, "identity", "gelu"),
    "gelu_tanh": ActivationSpec(False, "identity", "gelu_tanh"),
}


def with_threshold(activation: str, threshold: float) -> ActivationSpec:
    """The spec of a table name with FATReLU's threshold t (ignored by the other functions)."""
    return dataclasses.replace(activation_spec(activation), threshold=float(threshold))


def code_name(code: int) -> str:
    """The FUNCTIONS name of a code."""
    return next(name for name, c in FUNCTIONS.items() if c == code)


def apply_fn(name: str, v: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """One element-wise function of FUNCTIONS (in the dtype of v); `threshold` is read by fatrelu only."""
    if name == "identity":
        return v
    if name == "silu":
        return F.silu(v)
    if name == "relu":
        return torch.relu(v)
    if name == "relu2":
        return torch.relu(v).square()
    if name == "gelu":
        return F.gelu(v)
    if name == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if name == "fatrelu":  # >=, as ProSparse's training code
        return torch.where(v >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))
    raise ValueError(f"unknown element-wise function {name!r}")


def activation_spec(activation: str | ActivationSpec) -> ActivationSpec:
    """The spec of a table name; a spec is its own (how a FATReLU threshold reaches the kernels)."""
    if isinstance(activation, ActivationSpec):
        return activation
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}") from None


def check_gate_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str | ActivationSpec,
    w_gate: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    gate_bias: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> ActivationSpec:
    """Validate the arguments of gathered_gate_up (shapes and dtypes only: no device sync). Weights and biases
    may be strided views (the executor passes gate_up[:, 0] / gate_up_bias[:, 1], stride 2): every backend
    must index them through their strides."""
    spec = activation_spec(activation)
    if x.dim() != 2 or w_up.dim() != 2 or x.shape[1] != w_up.shape[1]:
        raise ValueError(f"x must be [B,H] and w_up [I,H]; got {tuple(x.shape)} and {tuple(w_up.shape)}")
    _check_idx(idx)
    if spec.gated:
        if w_gate is None or w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
            raise ValueError(f"activation {activation!r} needs w_gate with the shape and dtype of w_up")
    elif w_gate is not None:
        raise ValueError(f"activation {activation!r} is not gated: pass w_gate=None")
    for name, bias in (("up_bias", up_bias), ("gate_bias", gate_bias)):
        if bias is not None and (bias.shape != (w_up.shape[0],) or not bias.is_floating_point()):
            raise ValueError(f"{name} must be a float [I]={w_up.shape[0]}; got {bias.dtype} {tuple(bias.shape)}")
    if gate_bias is not None and not spec.gated:
        raise ValueError(f"activation {activation!r} is not gated: pass gate_bias=None")
    if token_mask is not None and (
        token_mask.dtype != torch.bool or token_mask.shape != (x.shape[0], idx.numel())
    ):
        raise ValueError(f"token_mask must be bool [B,K]=({x.shape[0]}, {idx.numel()}); got "
                         f"{token_mask.dtype} {tuple(token_mask.shape)}")
    check_count(count)
    _check_devices(x, w_up, idx, w_gate, up_bias, token_mask, gate_bias, count)
    return spec


def check_down(h: torch.Tensor, w_down_t: torch.Tensor, idx: torch.Tensor, count: torch.Tensor | None = None
               ) -> None:
    """Validate the arguments of gathered_down."""
    _check_idx(idx)
    if h.dim() != 2 or w_down_t.dim() != 2 or h.shape[1] != idx.numel():
        raise ValueError(f"h must be [B,K] with K=len(idx)={idx.numel()} and w_down_t [I,H]; got "
                         f"{tuple(h.shape)} and {tuple(w_down_t.shape)}")
    check_count(count)
    _check_devices(h, w_down_t, idx, count)


def check_count(count: torch.Tensor | None) -> None:
    if count is not None and (count.numel() != 1 or count.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"count must be one int32/int64 element; got {count.dtype} {tuple(count.shape)}")


def live(k: int, count: torch.Tensor | None) -> int:
    """How many of k ids are live (reads count on the host: what the dispatcher gives the host backends)."""
    return k if count is None else max(0, min(k, int(count.reshape(-1)[0])))


def _check_devices(*tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")


def _check_idx(idx: torch.Tensor) -> None:
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be a 1-D int64/int32 tensor; got {idx.dtype} {tuple(idx.shape)}")


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
) -> torch.Tensor:
    """h[b,k] = act(rows idx[k] of the gate/up projections at x[b]) as fp32 [B,K]; masked entries are 0."""
    spec = check_gate_up(x, w_up, idx, activation, w_gate, up_bias, token_mask, gate_bias)
    idx = idx.long()
    xw = x.to(w_up.dtype).float()
    u = xw @ w_up[idx].float().T
    if up_bias is not None:
        u = u + up_bias[idx].float()
    h = apply_fn(spec.up_fn, u, spec.threshold)
    if spec.gated:
        g = xw @ w_gate[idx].float().T
        if gate_bias is not None:
            g = g + gate_bias[idx].float()
        h = apply_fn(spec.gate_fn, g, spec.threshold) * h
    if token_mask is not None:
        h = torch.where(token_mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h


def gathered_down(
    h: torch.Tensor, w_down_t: torch.Tensor, idx: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """y[b] = sum_k h[b,k] * w_down_t[idx[k]] as [B,H] in out_dtype (fp32 accumulation)."""
    check_down(h, w_down_t, idx)
    y = h.to(w_down_t.dtype).float() @ w_down_t[idx.long()].float()
    return y.to(out_dtype)
