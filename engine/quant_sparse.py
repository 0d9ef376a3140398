"""A plan's neuron-sparse FFN over quantized rows, on the CPU: the dense path's blocks, only fewer of them.

Gate and up rows stay the checkpoint's own blocks (interleaved per neuron, as `QuantFFN` holds them). GGUF
stores `ffn_down` as [H, I], where a neuron's weights are one value per row; its Q4_0/Q4_1/Q8_0 blocks are
rearranged input-major at load (kernels.input_sparse: losslessly, no larger), so that a neuron's down weights
are one contiguous row of codes, and the down product is an input-sparse one over the active neurons. Other
types are re-quantized neuron-major into `down_t` [I, H] rows (PowerInfer's converter; here in Q8_0: a second
4-bit rounding cost the default model 8% perplexity). PowerInfer files' own `ffn_down_t` is used as stored.
Those are the only copy of the FFN. Per step and layer:

    predictor (its two products through the same integer kernels) or oracle -> mask [T, I]
      -> the union's ids -> dots of the active gate/up rows, activation, per-token mask, then the down
         product over the active inputs (kernels/tsparse.c), or one native call over down_t (kernels/qsparse.c)

Every token sums only its own active neurons, in a fixed order, so its result does not depend on the other
tokens of the step; prefill chunks run the same path. The engine's `predicted_mask` is the decision rule.
"""

from __future__ import annotations

import torch
from torch import nn

from hotcold.engine.errors import HotcoldError
from hotcold.engine.layers import Norm, QuantFFN
from hotcold.engine.plan import LayerPlan
from hotcold.engine.sparsity import plan_predictor, predicted_mask
from hotcold.kernels import input_sparse, native, quant
from hotcold.kernels.quant import QuantTensor


def _matrix(w: torch.Tensor) -> QuantTensor | torch.Tensor:
    """A predictor matrix in Q8_0 where its width allows (the same integer kernels as the model), else fp32."""
    w = w.detach().float()
    return quant.quantize(w, "Q8_0") if w.shape[1] % 32 == 0 else w.contiguous()


def _product(w: QuantTensor | torch.Tensor, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    """fp32 rmsnorm(x) @ w.T (norm folded into the native call), one token at a time in a fixed order."""
    if isinstance(w, QuantTensor):
        return quant.dots(w, x, norm=None if norm is None else norm.weight, eps=norm.eps if norm else 0.0)[..., 0]
    x = x.float() if norm is None else quant.rms_norm(x, norm.weight, norm.eps)
    return torch.stack([xi @ w.T for xi in x]) if x.shape[0] > 1 else x @ w.T


def expected_density(layer: LayerPlan, mode: str, strategy: str) -> float:
    """The share of a layer's neurons a plan expects each token to compute: its measured predicted density in
    predictor mode (top-k: k / I), the true one in oracle mode. A layer above the calibrated crossover
    (kernels.calibrate: sparse_max_density) runs dense, which reads less (apply_hybrid)."""
    p = layer.predictor
    if mode == "oracle" or p is None:
        return 1.0 - layer.sparsity
    if strategy == "topk":
        return p.top_k / max(1, layer.num_neurons)
    return 1.0 - p.sparsity


class QuantSparseFFN(nn.Module):
    """Drop-in for a `QuantFFN` driven by one plan layer (oracle thresholds or the plan's predictor)."""

    folds_norm = True  # Block passes the RMS norm in: it runs inside the native calls

    def __init__(self, ffn: QuantFFN, layer: LayerPlan, mode: str, strategy: str, counters,
                 down_type: str = "input-major"):
        super().__init__()
        if mode not in ("oracle", "predictor"):
            raise HotcoldError(f"unknown sparsity mode {mode!r}")
        # its active rows are gathered: row-major again, in place (no second copy while converting; `ffn`
        # takes the row-major matrix too, so it stays usable)
        self.gate_up = ffn.gate_up = quant.untile(ffn.gate_up, in_place=True)
        self.gate_up_bias, self.down_bias = ffn.gate_up_bias, ffn.down_bias
        self.parts, self.codes, self.index = 2 if ffn.gated else 1, ffn.codes, layer.index
        self.intermediate_size = ffn.intermediate_size
        self.down_t = self.down = None  # one of the two: neuron-major rows, or down input-major
        if ffn.down_t is None and down_type == "input-major" and input_sparse.supported(ffn.down):
            ffn.down = quant.untile(ffn.down, in_place=True)
            self.down = input_sparse.to_input_major(ffn.down)
        else:
            self.down_t = ffn.down_t if ffn.down_t is not None else quant.transpose(
                ffn.down, "Q8_0" if down_type == "input-major" else down_type)
            native.use_huge_pages(self.down_t.data)  # gathered rows: a TLB walk each on 4 KiB pages
        self.threshold, self.counters = layer.threshold, counters
        self.predicts = mode == "predictor"
        if not self.predicts:  # |h_i| * ||down_t[i]|| > threshold: the plan's activity rule
            self.norms = (self.down.dequantize().norm(dim=0) if self.down_t is None
                          else self.down_t.dequantize().norm(dim=1))
        else:  # only the predictor's matrices in Q8_0 and its rule are kept, not its fp32 module
            pred, self.rule = plan_predictor(layer, strategy, "cpu")
            self.rule_kind, self.input = pred.rule, pred.input
            self.fc1, self.fc2 = _matrix(pred.fc1.weight), _matrix(pred.fc2.weight)
            self.b1 = None if pred.fc1.bias is None else pred.fc1.bias.detach().float()
            self.b2 = None if pred.fc2.bias is None else pred.fc2.bias.detach().float()

    @property
    def wants_residual(self) -> bool:
        return self.predicts and self.input == "residual"

    def active_mask(self, x: torch.Tensor, norm: Norm | None, residual: torch.Tensor | None) -> torch.Tensor:
        """[T, I] bool: the neurons each token computes."""
        if not self.predicts:
            z = quant.dots(self.gate_up, x, parts=self.parts, norm=None if norm is None else norm.weight,
                           eps=norm.eps if norm else 0.0)
            h = quant.activate(z, self.codes[0], self.codes[1], self.gate_up_bias, self.codes[2])
            return h.abs() * self.norms > self.threshold
        if self.wants_residual:
            if residual is None:
                raise HotcoldError("this predictor reads the residual before the FFN norm, which was not passed")
            x, norm = residual, None
        hidden = _product(self.fc1, x, norm)
        hidden = torch.relu(hidden if self.b1 is None else hidden + self.b1)
        logits = _product(self.fc2, hidden, None)
        return predicted_mask(logits if self.b2 is None else logits + self.b2, rule=self.rule_kind, **self.rule)

    def forward(self, x: torch.Tensor, norm: Norm | None = None, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        if norm is not None and norm.kind != "rms":
            x, norm = norm(x), None
        T = x.shape[0]
        mask = self.active_mask(x, norm, residual)
        ids = (mask[0] if T == 1 else mask.any(0)).nonzero().flatten()
        active = ids.numel() if T == 1 else int(mask.sum())
        self.counters.add(self.index, active, 0, T * self.intermediate_size)
        run = quant.sparse_ffn if self.down is None else input_sparse.sparse_ffn
        y = run(x, self.gate_up, self.down_t if self.down is None else self.down, self.parts, ids, self.codes[0],
                self.codes[1], mask=None if T == 1 else mask[:, ids], gate_up_bias=self.gate_up_bias,
                norm=None if norm is None else norm.weight, eps=norm.eps if norm else 0.0, threshold=self.codes[2])
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)
