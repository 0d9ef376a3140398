"""Activation predictors: a low-rank MLP per layer, trained on (FFN input, active mask) pairs.

Training uses weighted binary cross-entropy: positives weigh the layer's inactive/active ratio (rare
activations are not ignored) times, when magnitude codes are given, their output energy relative to the
mean active neuron's (clamped to [0.01, 100]): missing a neuron costs about its squared output, so misses
are steered towards the small ones. Adam, inputs standardised during training and the standardisation
folded back into the first layer afterwards. The decision rules are tuned on validation tokens for a
recall target: tau (probability threshold) and k (top-k).

Rank choice: unless given, each layer tries ranks from small to the largest its budget allows (all
predictors together <= `budget_fraction` of the FFN parameters), doubling, and keeps the smallest rank
whose next doubling gains less than `sparsity_tolerance` of prediction sparsity at the recall target.

Magnitude codes (uint8, one per token and neuron): 0 = inactive, otherwise
clamp(round(8 * log2(magnitude / reference)) + 128, 1, 255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hotcold.engine.sparsity import LowRankPredictor, predicted_mask


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_pos_weight: float = 20.0
    seed: int = 0
    device: str = "auto"  # where to train: auto = CUDA when there is one (a 7B model's 32 layers take hours
    #   on a CPU), else the CPU; the trained predictor always comes back to the CPU


@dataclass
class FittedPredictor:
    module: LowRankPredictor
    tau: float
    top_k: int
    val_recall: float  # recall at tau on the validation tokens
    val_sparsity: float  # fraction predicted inactive at tau on the validation tokens
    tried: dict[int, float]  # rank -> validation sparsity at the recall target


def magnitude_codes(magnitude: Tensor, active: Tensor, reference: float) -> Tensor:
    """uint8 codes of active neurons' magnitudes relative to `reference` (0 = inactive)."""
    ratio = (magnitude.float() / max(reference, 1e-30)).clamp_min(1e-30)
    code = (torch.log2(ratio) * 8).round().add(128).clamp(1, 255).to(torch.uint8)
    return torch.where(active, code, torch.zeros_like(code))


def weight_table(codes: Tensor, pos_weight: float) -> Tensor:
    """BCE weight per code: 1 for inactive, pos_weight * relative output energy (clamped) for active."""
    ratio2 = torch.pow(2.0, (torch.arange(256, dtype=torch.float64) - 128) / 4)  # (magnitude/reference)^2
    hist = torch.bincount(codes.flatten().long(), minlength=256).double()
    hist[0] = 0
    mean = float((hist * ratio2).sum() / hist.sum().clamp_min(1))
    table = pos_weight * (ratio2 / max(mean, 1e-30)).clamp(0.01, 100.0)
    table[0] = 1.0
    return table.float()


def train_predictor(x: Tensor, y: Tensor, rank: int, cfg: TrainConfig,
                    codes: Tensor | None = None) -> LowRankPredictor:
    """Fit hidden -> rank -> intermediate logits to the boolean mask y [N, I] from inputs x [N, H]
    (with `codes`, positives are weighted by their output energy)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    pos = float(y.float().mean())
    pos_weight = min(cfg.max_pos_weight, max(1.0, (1 - pos) / max(pos, 1e-6)))
    table = None if codes is None else weight_table(codes, pos_weight).to(device)
    x, y = x.float().to(device), y.to(device)
    codes = None if codes is None else codes.to(device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    N, H = x.shape
    I = y.shape[1]
    torch.manual_seed(cfg.seed)
    model = LowRankPredictor(H, rank, I).to(device)
    with torch.no_grad():  # start from the base rate: logit(p) on every neuron
        rate = y.float().mean(0).clamp(1e-4, 1 - 1e-4)
        model.fc2.bias.copy_(torch.log(rate / (1 - rate)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    for _ in range(cfg.steps):
        idx = torch.randint(0, N, (min(cfg.batch_size, N),), generator=gen).to(device)
        target = y[idx].float()
        if table is None:
            weight = torch.where(target > 0, pos_weight, 1.0)
        else:
            weight = table[codes[idx].long()]
        loss = F.binary_cross_entropy_with_logits(model(xs[idx]), target, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # fold the standardisation into fc1: W (x - m) / s + b = (W / s) x + (b - W m / s)
        w = model.fc1.weight / std
        model.fc1.bias.sub_(w @ mean)
        model.fc1.weight.copy_(w)
    return model.cpu().eval()


def tune_tau(logits: Tensor, y: Tensor, recall_target: float) -> float:
    """Largest probability threshold whose recall of the active neurons in y is >= recall_target."""
    p = torch.sigmoid(logits.float())[y.bool()]
    if p.numel() == 0:
        return 1.0
    need = min(p.numel(), max(1, math.ceil(recall_target * p.numel() - 1e-9)))
    return float(p.sort(descending=True).values[need - 1])


def tune_top_k(logits: Tensor, y: Tensor, recall_target: float) -> int:
    """Smallest k for which the top-k logits of each token cover >= recall_target of the active neurons."""
    y = y.bool()
    if not bool(y.any()):
        return 0
    order = logits.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    pos_ranks = ranks[y].sort().values
    need = min(pos_ranks.numel(), max(1, math.ceil(recall_target * pos_ranks.numel() - 1e-9)))
    return int(pos_ranks[need - 1]) + 1


def recall_sparsity(pred: Tensor, y: Tensor) -> tuple[float, float]:
    """(recall of the active neurons, fraction predicted inactive) of boolean predictions."""
    y = y.bool()
    pos = int(y.sum())
    recall = float((pred & y).sum()) / pos if pos else 1.0
    return recall, 1.0 - float(pred.float().mean())


def max_rank(hidden: int, intermediate: int, ffn_params: int, budget_fraction: float = 0.1) -> int:
    """Largest rank whose predictor has <= budget_fraction of the layer's FFN parameters."""
    r = int((budget_fraction * ffn_params - intermediate) // (hidden + intermediate + 1))
    return max(r, 1)


def fit_layer(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, recall_target: float,
              ranks: list[int], cfg: TrainConfig, sparsity_tolerance: float = 0.02,
              codes_train: Tensor | None = None) -> FittedPredictor:
    """Train candidate ranks (ascending), tune tau and k on validation tokens, return the smallest rank whose
    next larger candidate gains less than `sparsity_tolerance` of prediction sparsity."""
    ranks = sorted(set(ranks))
    tried: dict[int, float] = {}
    best = None
    for r in ranks:
        model = train_predictor(x_train, y_train, r, cfg, codes_train)
        with torch.no_grad():
            logits = model(x_val.float())
        tau = tune_tau(logits, y_val, recall_target)
        recall, sparsity = recall_sparsity(predicted_mask(logits, tau=tau), y_val)
        tried[r] = sparsity
        if best is not None and sparsity < best[3] + sparsity_tolerance:
            break
        best = (model, tau, recall, sparsity, logits)
    model, tau, recall, sparsity, logits = best
    top_k = tune_top_k(logits, y_val, recall_target)
    return FittedPredictor(model, tau, top_k, recall, sparsity, tried)


def candidate_ranks(limit: int, smallest: int = 16) -> list[int]:
    """..., limit/4, limit/2, limit: halvings of the budget's rank down to `smallest` (ascending)."""
    out = [limit]
    while out[-1] // 2 >= smallest:
        out.append(out[-1] // 2)
    return out[::-1]
