"""The parts a transformer block is made of, beside attention: the norm, the one `linear` every projection
goes through (float weights; quantized ones, as GGUF blocks on the CPU or as quantized rows on a GPU; or
input-sparse ones), and the FFNs (`DenseFFN`, `QuantFFN`, `MoEFFN`), all with `activations(x) -> h` and
`project_down(h) -> y` where they are dense, so sparse versions can replace them (engine/hybrid.py,
engine/quant_sparse.py, engine/input_sparsity.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hotcold import kernels
from hotcold.engine.activations import activate, gate_up_bias, kernel_activation
from hotcold.engine.config import GATED
from hotcold.engine.input_sparsity import SparseInput
from hotcold.kernels import cpu_sparse, native, quant
from hotcold.kernels.qrows import QRows
from hotcold.kernels.quant import QuantTensor
from hotcold.kernels.reference import FUNCTIONS

Weight = torch.Tensor | QuantTensor | QRows | SparseInput


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None, norm: Norm | None = None) -> torch.Tensor:
    """F.linear(norm(x)), but quantized weights run in their blocks (kernels.quant, with an RMS norm folded
    into the same call), and a few tokens over float weights on the CPU go through the native kernels where
    the calibration measured them faster than torch (kernels.calibrate). fp32 accumulation. A SparseInput weight
    drops its small inputs first (engine.input_sparsity)."""
    if isinstance(w, SparseInput):
        return w.product(x if norm is None else norm(x), b)
    if isinstance(w, QRows):  # quantized rows on a GPU side (engine.hybrid.move_dense_parts)
        xn = (x if norm is None else norm(x)).reshape(-1, x.shape[-1])
        y = kernels.quantized_linear(xn.float().contiguous(), w).view(*x.shape[:-1], w.shape[0])
        return (y if b is None else y + b.float()).to(x.dtype)
    if isinstance(w, QuantTensor):
        fold = norm is not None and norm.kind == "rms"
        if norm is not None and not fold:
            x = norm(x)
        y = quant.linear(x.reshape(-1, x.shape[-1]), w, norm=norm.weight if fold else None,
                         eps=norm.eps if fold else 0.0).view(*x.shape[:-1], w.shape[0])
        return (y if b is None else y + b.float()).to(x.dtype)
    if norm is not None:
        x = norm(x)
    if x.dim() == 2 and native.preferred(x.shape[0], w):
        y = native.linear(x, w)
        return (y if b is None else y + b.float()).to(x.dtype)
    return F.linear(x, w, b)


class NeuronRows:
    """Views of interleaved gate/up rows (`gate_up` [I, 2, H] when gated, else up [I, H]) and their biases."""

    activation: str
    gelu_approximate: str
    threshold: float  # FATReLU's t
    gated: bool
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """h [.., I] of every row: one GEMM for gate and up."""
        if self.gated:
            bias = None if self.gate_up_bias is None else self.gate_up_bias.reshape(-1)
            z = F.linear(x, self.gate_up.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1, 2)
            return activate(self.activation, z[..., 1], z[..., 0], self.gelu_approximate, self.threshold)
        return activate(self.activation, F.linear(x, self.gate_up, self.gate_up_bias), None, self.gelu_approximate,
                        self.threshold)

    @property
    def gate(self) -> torch.Tensor | None:
        return self.gate_up[:, 0] if self.gated else None

    @property
    def up(self) -> torch.Tensor:
        return self.gate_up[:, 1] if self.gated else self.gate_up

    @property
    def up_bias(self) -> torch.Tensor | None:
        if self.gate_up_bias is None:
            return None
        return self.gate_up_bias[:, 1] if self.gated else self.gate_up_bias

    @property
    def gate_bias(self) -> torch.Tensor | None:
        return self.gate_up_bias[:, 0] if self.gated and self.gate_up_bias is not None else None


class DenseFFN(nn.Module, NeuronRows):
    """All neurons. Each neuron owns contiguous rows: gate and up interleaved as `gate_up` [I, 2, H] (one GEMM
    for both, and one gather fetches both rows of a neuron), down stored transposed as `down_t` [I, H]."""

    def __init__(self, activation: str, up: torch.Tensor, down_t: torch.Tensor, gate: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, gelu_approximate: str = "none", threshold: float = 0.0):
        super().__init__()
        self.activation = activation
        self.gelu_approximate = gelu_approximate
        self.threshold = threshold
        self.intermediate_size = up.shape[0]
        self.gated = activation in GATED
        self.gate_up = torch.stack([gate, up], dim=1).contiguous() if self.gated else up.contiguous()
        self.gate_up_bias = gate_up_bias(self.gated, up_bias, gate_bias)
        self.down_t = down_t.contiguous()
        self.down_bias = down_bias

    def project_down(self, h: torch.Tensor) -> torch.Tensor:
        y = h @ self.down_t
        return y if self.down_bias is None else y + self.down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and native.preferred(x.shape[0], self.gate_up, self.down_t):
            return self._forward_native(x)
        return self.project_down(self.activations(x))

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """A few tokens on the CPU: every row through the native kernels (one call), which stream each row
        once where torch's small-M product reaches half the memory bandwidth (2x: benchmarks/ffn_cpu.py).
        fp32 accumulation; h is rounded to the weights' dtype before the down projection, as torch's is."""
        y = cpu_sparse.gathered_ffn(x, self.up, self.down_t, torch.arange(self.intermediate_size),
                                    kernel_activation(self.activation, self.gelu_approximate, self.threshold),
                                    self.gate,
                                    self.up_bias, gate_bias=self.gate_bias)
        return (y if self.down_bias is None else y + self.down_bias.float()).to(x.dtype)


class QuantFFN(nn.Module):
    """The dense FFN over quantized weights, kept as the checkpoint stores them: gate and up rows interleaved
    (one product for both, [2I, H]) and down as [H, I] rows (GGUF's own layout: no re-quantization)."""

    folds_norm = True  # Block passes the RMS norm in: it runs inside the native call

    def __init__(self, activation: str, up: QuantTensor, down: QuantTensor | None, gate: QuantTensor | None = None,
                 up_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, gelu_approximate: str = "none", threshold: float = 0.0,
                 down_t: QuantTensor | None = None):
        super().__init__()
        self.activation, self.gelu_approximate = activation, gelu_approximate
        self.gated = activation in GATED
        self.intermediate_size = up.shape[0]
        self.gate_up = quant.interleave(gate, up) if self.gated else up
        bias = gate_up_bias(self.gated, up_bias, gate_bias)
        self.gate_up_bias = None if bias is None else bias.reshape(-1)  # matches gate_up's interleaved rows
        # down [H, I] as GGUF stores it, or (PowerInfer GGUFs: `ffn_down_t`) only its neuron-major down_t [I, H]
        self.down, self.down_t, self.down_bias = down, down_t, down_bias
        self._all = torch.arange(self.intermediate_size)
        spec = kernel_activation(activation, gelu_approximate, threshold)
        self.codes = (FUNCTIONS[spec.gate_fn], FUNCTIONS[spec.up_fn], spec.threshold)  # as BlockWeights takes them

    def forward(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """One native call: RMS norm (when given), gate/up product, activation, down product."""
        if norm is not None and norm.kind != "rms":
            x, norm = norm(x), None
        if isinstance(self.gate_up, SparseInput) or isinstance(self.down, SparseInput):
            return self._forward_input_sparse(x, norm)
        if self.down is None:  # every neuron through the sparse kernel over down_t: no second copy of down
            y = quant.sparse_ffn(x, self.gate_up, self.down_t, 2 if self.gated else 1, self._all, self.codes[0],
                                 self.codes[1], gate_up_bias=self.gate_up_bias,
                                 norm=None if norm is None else norm.weight, eps=norm.eps if norm else 0.0,
                                 threshold=self.codes[2])
            return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)
        y = quant.ffn(x, self.gate_up, self.down, 2 if self.gated else 1, self.codes[0], self.codes[1],
                      self.gate_up_bias, None if norm is None else norm.weight, norm.eps if norm else 0.0,
                      threshold=self.codes[2])
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)


    def _forward_input_sparse(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """The per-op path with input-sparse products (engine.input_sparsity): every token sparse."""
        z = linear(x, self.gate_up, None, norm).float()
        parts = 2 if self.gated else 1
        h = quant.activate(z.view(-1, self.intermediate_size, parts), *self.codes[:2], self.gate_up_bias,
                           self.codes[2])
        y = linear(h, self.down).float()
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)


class MoEFFN(nn.Module):
    """Mixtral's sparse mixture of experts: softmax router, top-k experts, weights renormalised."""

    def __init__(self, router: torch.Tensor, experts: list[DenseFFN], top_k: int):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            if tokens.numel():
                out.index_add_(0, tokens, expert(x[tokens]) * weights[tokens, slot, None])
        return out


class Norm(nn.Module):
    """RMSNorm (computed in float32, as transformers does) or LayerNorm."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.kind, self.weight, self.bias, self.eps = kind, weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        normed = F.rms_norm(x.float(), x.shape[-1:], None, self.eps)
        return self.weight * normed.to(x.dtype)
