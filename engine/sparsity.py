"""Unfused reference sparsity: run a model with a plan's neurons switched off, to measure a plan's quality.

`MaskedFFN` wraps a dense FFN, computes the dense activations h, zeroes the neurons the plan calls inactive
(oracle: magnitude <= threshold; predictor: the predictor says inactive) and projects down. It is the
correctness reference for the hybrid executor, not a fast path. No profiler imports: the engine uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hotcold.engine.errors import HotcoldError
from hotcold.engine.plan import LayerPlan, Plan, load_plan

MODES = ("oracle", "predictor")
STRATEGIES = ("threshold", "topk")


RULES = ("sigmoid", "logit")  # how a threshold predictor's tau is compared (see predicted_mask)
INPUTS = ("ffn_norm", "residual")  # what a predictor reads: the FFN's normed input, or the residual before it


class LowRankPredictor(nn.Module):
    """hidden -> rank -> intermediate MLP whose logits say which FFN neurons will be active (Deja Vu).

    hotcold's own predictors have biases, read the normed FFN input and compare sigmoid(logit) >= tau;
    PowerInfer's (TurboSparse/Bamboo `mlp.predictor`, `model_{i}.pt`) have no biases, read the residual
    stream before the FFN norm (`ffn_inp`) and compare the raw logit >= sparse_threshold. `bias`, `rule`
    and `input` select between the two so there is one predictor implementation."""

    def __init__(self, hidden: int, rank: int, intermediate: int, bias: bool = True, rule: str = "sigmoid",
                 input: str = "ffn_norm") -> None:
        super().__init__()
        if rule not in RULES or input not in INPUTS:
            raise HotcoldError(f"unknown predictor rule {rule!r} or input {input!r}")
        self.fc1 = nn.Linear(hidden, rank, bias=bias)
        self.fc2 = nn.Linear(rank, intermediate, bias=bias)
        self.rule, self.input = rule, input

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    @property
    def rank(self) -> int:
        return self.fc1.out_features

    def export(self) -> dict[str, Tensor]:
        """Weights under the plan's names (w1, b1, w2, b2; no b1/b2 for a bias-free predictor)."""
        out = {"w1": self.fc1.weight.detach().clone(), "w2": self.fc2.weight.detach().clone()}
        if self.fc1.bias is not None:
            out.update(b1=self.fc1.bias.detach().clone(), b2=self.fc2.bias.detach().clone())
        return out

    @classmethod
    def from_weights(cls, w: dict[str, Tensor], rule: str = "sigmoid", input: str = "ffn_norm") -> LowRankPredictor:
        """A predictor from plan weights; biases only where the plan stores b1 and b2."""
        rank, hidden = w["w1"].shape
        bias = "b1" in w
        p = cls(hidden, rank, w["w2"].shape[0], bias=bias, rule=rule, input=input)
        with torch.no_grad():
            p.fc1.weight.copy_(w["w1"])
            p.fc2.weight.copy_(w["w2"])
            if bias:
                p.fc1.bias.copy_(w["b1"])
                p.fc2.bias.copy_(w["b2"])
        return p.eval()

    @staticmethod
    def num_params(hidden: int, rank: int, intermediate: int) -> int:
        return rank * (hidden + 1) + intermediate * (rank + 1)

    @torch.no_grad()
    def predict(self, x: Tensor, tau: float | None = None, top_k: int | None = None) -> Tensor:
        """The active mask of inputs x [..., H] under one decision rule (see predicted_mask): what the
        executor runs and what the profiler's evaluation and MaskedFFN measure, so the two cannot drift."""
        return predicted_mask(self(x.to(self.fc1.weight.dtype)), tau, top_k, self.rule)


def predicted_mask(logits: Tensor, tau: float | None = None, top_k: int | None = None,
                   rule: str = "sigmoid") -> Tensor:
    """Neurons a predictor calls active: sigmoid(logit) >= tau (rule "sigmoid"), logit >= tau (rule "logit",
    PowerInfer's `idx < sparse_threshold` skips a row), or the top_k logits of each token.

    The one decision rule of the project (profiler evaluation, MaskedFFN, hybrid executor). tau is compared
    as a probability, not as a logit cut log(tau/(1-tau)): the profiler tunes tau as one of these fp32
    sigmoid values, so the same comparison reproduces the tuned recall exactly (a logit cut can flip the
    boundary neurons by rounding, and tau = 1.0, tuned on a layer never active, has no finite logit).
    top_k is clamped to [0, I]: k = 0 is what tune_top_k returns for a layer never active on the
    validation tokens, and the plan's quality was measured with no neuron computed there."""
    if top_k is not None:
        k = max(0, min(int(top_k), logits.shape[-1]))
        mask = torch.zeros_like(logits, dtype=torch.bool)
        if k:
            mask.scatter_(-1, logits.topk(k, dim=-1).indices, True)
        return mask
    if tau is None:
        raise ValueError("predicted_mask needs tau or top_k")
    if rule == "logit":
        return logits >= tau
    return torch.sigmoid(logits) >= tau


class MaskedFFN(nn.Module):
    """A dense FFN with some neurons zeroed per token: oracle thresholds or a predictor's decisions."""

    def __init__(self, ffn: nn.Module, threshold: float | None = None,
                 predictor: LowRankPredictor | None = None, tau: float | None = None,
                 top_k: int | None = None) -> None:
        super().__init__()
        if not hasattr(ffn, "activations") or not hasattr(ffn, "project_down"):
            raise HotcoldError(f"{type(ffn).__name__} is not a dense FFN: sparsity plans need dense FFNs "
                               "(mixture-of-experts models are not supported)")
        if (threshold is None) == (predictor is None):
            raise ValueError("MaskedFFN needs exactly one of threshold or predictor")
        self.ffn = ffn
        self.threshold = threshold
        self.predictor = predictor
        self.tau, self.top_k = tau, top_k
        self.register_buffer("down_norm", ffn.down_t.detach().float().norm(dim=1), persistent=False)
        self.active = 0.0  # running count of active (token, neuron) pairs
        self.total = 0.0

    @property
    def sparsity(self) -> float | None:
        return None if self.total == 0 else 1.0 - self.active / self.total

    @property
    def wants_residual(self) -> bool:
        """True when the predictor reads the residual before the FFN norm (Block then passes it)."""
        return self.predictor is not None and self.predictor.input == "residual"

    def mask(self, x: Tensor, h: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.predictor is not None:
            return self.predictor.predict(predictor_input(self.predictor, x, residual), self.tau, self.top_k)
        return h.float().abs() * self.down_norm > self.threshold

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = self.ffn.activations(x2)
        # subclasses (the profiler's PredictorProbe) override mask(x, h): the residual only when there is one
        m = self.mask(x2, h) if residual is None else self.mask(x2, h, residual.reshape(-1, shape[-1]))
        self.active += float(m.sum())
        self.total += m.numel()
        out = self.ffn.project_down(h * m.to(h.dtype))
        return out.reshape(*shape[:-1], out.shape[-1])


def masked_ffn_for(ffn: nn.Module, layer: LayerPlan, mode: str, strategy: str = "threshold") -> MaskedFFN:
    """The MaskedFFN of one plan layer."""
    if mode not in MODES:
        raise HotcoldError(f"unknown sparsity mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "oracle":
        return MaskedFFN(ffn, threshold=layer.threshold)
    pred, rule = plan_predictor(layer, strategy, ffn.down_t.device)
    return MaskedFFN(ffn, predictor=pred, **rule)


def predictor_input(pred: LowRankPredictor, x: Tensor, residual: Tensor | None) -> Tensor:
    """What `pred` reads: the FFN input x, or the pre-norm residual (an error if the caller has none, so a
    residual predictor is never silently fed the normed input)."""
    if pred.input != "residual":
        return x
    if residual is None:
        raise HotcoldError("this predictor reads the residual before the FFN norm, which was not passed")
    return residual


def plan_predictor(layer: LayerPlan, strategy: str, device: torch.device | str) -> tuple[LowRankPredictor, dict]:
    """A plan layer's predictor on `device` and its decision rule as predict() keywords ({"tau": t} or
    {"top_k": k}): the one way the engine's MaskedFFN and the hybrid executor read a plan's predictor."""
    if layer.predictor is None or not layer.predictor.weights:
        raise HotcoldError(f"the plan has no predictor for layer {layer.index}; use --sparsity oracle")
    if strategy not in STRATEGIES:
        raise HotcoldError(f"unknown predictor strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    pred = LowRankPredictor.from_weights(layer.predictor.weights, layer.predictor.rule,
                                         layer.predictor.input).to(device=device)
    pred.requires_grad_(False)
    rule = {"top_k": layer.predictor.top_k} if strategy == "topk" else {"tau": layer.predictor.tau}
    return pred, rule


def apply_plan(model: nn.Module, plan: Plan, mode: str = "oracle", strategy: str = "threshold") -> list[nn.Module]:
    """Replace every layer's `.ffn` with its MaskedFFN; returns the original modules for `restore_dense`."""
    layers = list(model.layers)
    if len(layers) != len(plan.layers):
        raise HotcoldError(f"the plan has {len(plan.layers)} layers, the model {len(layers)}")
    originals: list[nn.Module] = []
    for block, lp in zip(layers, sorted(plan.layers, key=lambda lp: lp.index), strict=True):
        ffn = block.ffn.ffn if isinstance(block.ffn, MaskedFFN) else block.ffn
        if hasattr(ffn, "down_t") and ffn.down_t.shape[0] != lp.num_neurons:
            raise HotcoldError(f"layer {lp.index}: the plan has {lp.num_neurons} neurons, the model "
                               f"{ffn.down_t.shape[0]}")
        originals.append(ffn)
        block.ffn = masked_ffn_for(ffn, lp, mode, strategy)
    return originals


def restore_dense(model: nn.Module, originals: list[nn.Module]) -> None:
    for block, ffn in zip(model.layers, originals, strict=True):
        block.ffn = ffn


def measured_sparsity(model: nn.Module) -> float | None:
    """Fraction of inactive neurons over every MaskedFFN call since they were applied."""
    active = total = 0.0
    for block in model.layers:
        if isinstance(block.ffn, MaskedFFN):
            active += block.ffn.active
            total += block.ffn.total
    return None if total == 0 else 1.0 - active / total


@contextmanager
def sparsified(model: nn.Module, plan: Plan, mode: str = "oracle", strategy: str = "threshold") -> Iterator[None]:
    """`with sparsified(model, plan, "predictor"): ...` runs the model with the plan, then restores it."""
    originals = apply_plan(model, plan, mode, strategy)
    try:
        yield
    finally:
        restore_dense(model, originals)


@dataclass
class PlanPerplexity:
    perplexity: float
    sparsity: float | None  # measured fraction of inactive FFN neurons
    mode: str


def perplexity_with_plan(loaded, plan: Plan | str | Path, token_ids: list[int] | Tensor, mode: str = "oracle",
                         context: int = 1024, strategy: str = "threshold") -> PlanPerplexity:
    """Perplexity of a LoadedModel over token_ids with a plan's sparsity applied (unfused reference path).
    A plan made for another model raises HotcoldError."""
    from hotcold.engine.perplexity import perplexity

    if getattr(loaded.config, "num_experts", 0):
        raise HotcoldError("mixture-of-experts models are not profiled: plans cover dense FFNs only")
    if not isinstance(plan, Plan):
        plan = load_plan(plan, fingerprint=loaded.fingerprint)
    else:
        plan.check_model(loaded.fingerprint)
    model = loaded.model
    with sparsified(model, plan, mode, strategy):
        ppl = perplexity(model, token_ids, context=context)
        sp = measured_sparsity(model)
    return PlanPerplexity(perplexity=float(ppl), sparsity=sp, mode=mode)
