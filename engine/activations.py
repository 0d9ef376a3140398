"""The FFN non-linearity on the dense torch path, by the kernels' own table (kernels.reference), so the dense
and sparse paths apply one rule each; FATReLU's threshold travels in the kernels' ActivationSpec."""

from __future__ import annotations

import torch

from hotcold.kernels.reference import ActivationSpec, apply_fn, with_threshold


def activate(activation: str, up: torch.Tensor, gate: torch.Tensor | None = None,
             gelu_approximate: str = "none", threshold: float = 0.0) -> torch.Tensor:
    """The FFN non-linearity: gated variants combine gate and up, plain ones act on up alone. The rule of each
    is the kernels' table (kernels.reference), so the dense and sparse paths cannot disagree."""
    spec = kernel_activation(activation, gelu_approximate, threshold)
    h = apply_fn(spec.up_fn, up, spec.threshold)
    return apply_fn(spec.gate_fn, gate, spec.threshold) * h if spec.gated else h


def kernel_activation(activation: str, gelu_approximate: str, threshold: float = 0.0) -> ActivationSpec:
    """The kernels' spec of the activation (kernels.reference.ACTIVATIONS): tanh GELU has its own entry, and
    FATReLU carries its threshold t."""
    tanh = gelu_approximate == "tanh" and activation in ("gelu", "geglu")
    try:
        return with_threshold(activation + ("_tanh" if tanh else ""), threshold)
    except ValueError:
        raise ValueError(f"unknown activation {activation!r}") from None


def gate_up_bias(gated: bool, up_bias: torch.Tensor | None, gate_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Biases in the gate/up layout: [I, 2] (gate, up) when gated, with zeros for the missing one; else up's."""
    if not gated or (up_bias is None and gate_bias is None):
        return up_bias
    return torch.stack([gate_bias if gate_bias is not None else torch.zeros_like(up_bias),
                        up_bias if up_bias is not None else torch.zeros_like(gate_bias)], dim=1).contiguous()
