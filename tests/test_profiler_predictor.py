"""Predictors: a synthetic low-rank rule is learnt to its recall target; tau/top-k tuning vs brute force."""

from __future__ import annotations

import math

import pytest
import torch

from hotcold.engine.sparsity import LowRankPredictor, predicted_mask
from hotcold.profiler import predictor as predictor_module
from hotcold.profiler.predictor import (
    TrainConfig,
    candidate_ranks,
    fit_layer,
    max_rank,
    recall_sparsity,
    train_predictor,
    tune_tau,
    tune_top_k,
)


def synthetic(n: int, seed: int, H: int = 32, I: int = 64, r: int = 4):
    """Neuron i is active iff (x A)_i > b_i with A of rank r; inputs shifted and scaled per channel."""
    g = torch.Generator().manual_seed(1234)  # the rule is fixed, the samples vary with seed
    A = torch.randn(H, r, generator=g) @ torch.randn(r, I, generator=g)
    b = torch.rand(I, generator=g) * 2 + 0.5
    scale, shift = torch.rand(H, generator=g) * 3 + 0.2, torch.randn(H, generator=g)
    z = torch.randn(n, H, generator=torch.Generator().manual_seed(seed))
    y = (z @ A) / math.sqrt(r * H) * 3 > b
    return z * scale + shift, y


def test_predictor_learns_low_rank_rule_to_recall_target():
    x, y = synthetic(6000, seed=0)
    xv, yv = synthetic(2000, seed=1)
    xt, yt = synthetic(4000, seed=2)
    fitted = fit_layer(x, y, xv, yv, recall_target=0.95, ranks=[16, 8],
                       cfg=TrainConfig(steps=300, batch_size=256, lr=1e-2))
    with torch.no_grad():
        logits = fitted.module(xt)
    true_sparsity = 1 - float(yt.float().mean())
    recall, sparsity = recall_sparsity(predicted_mask(logits, tau=fitted.tau), yt)
    assert true_sparsity > 0.6
    assert recall >= 0.93  # tuned for 0.95 on other samples
    assert sparsity >= true_sparsity - 0.12  # close to the oracle's sparsity, far from predicting all
    k_recall, k_sparsity = recall_sparsity(predicted_mask(logits, top_k=fitted.top_k), yt)
    assert k_recall >= 0.93 and k_sparsity > 0.3


class RecordingPredictor(LowRankPredictor):
    """LowRankPredictor that keeps a float64 copy of its layers as a training step sees them (a spy: the
    computation is the real one), so a test can see the trained layers before the standardisation is folded."""

    seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x):
        RecordingPredictor.seen.append({k: v.detach().double().clone() for k, v in self.state_dict().items()})
        return super().forward(x)


def test_standardisation_folded_into_first_layer(monkeypatch):
    """The exported predictor reads raw inputs: its logits must be the trained layers applied to the inputs
    standardised with the training set's mean and std (x - mean) / std, written out here in float64. lr = 0
    keeps the layers as the training steps saw them, so the spy's copy is what was folded."""
    monkeypatch.setattr(RecordingPredictor, "seen", [])
    monkeypatch.setattr(predictor_module, "LowRankPredictor", RecordingPredictor)
    x, y = synthetic(512, seed=3)  # per-channel shifts and scales: a fold with a wrong sign or scale shows
    model = train_predictor(x, y, 4, TrainConfig(steps=2, lr=0.0, device="cpu"))
    w = RecordingPredictor.seen[-1]
    xd = x.double()
    xs = (xd - xd.mean(0)) / xd.std(0)
    want = torch.relu(xs @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
    exported = LowRankPredictor.from_weights(model.export())
    with torch.no_grad():
        got = exported(x).double()
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert (w["fc1.bias"].abs() > 0).all() and (xd.mean(0).abs() > 0.1).any()  # the fold has work to do


def test_positives_weigh_the_inactive_to_active_ratio():
    """Weighted BCE with positives weighing w = (inactive / active) over all neurons: on inputs that carry no
    information the loss is minimised by the constant probability p_i w / (p_i w + 1 - p_i) per neuron
    (p_i its active rate), 0.5 for a neuron at the layer's mean rate, not p_i as unweighted BCE gives."""
    gen = torch.Generator().manual_seed(5)
    rates = torch.tensor([0.05, 0.1, 0.15, 0.2])
    x = torch.randn(4096, 4, generator=gen)
    y = torch.rand(4096, 4, generator=gen) < rates
    p = y.double().mean(0)
    w = (1 - p.mean()) / p.mean()
    assert w < TrainConfig().max_pos_weight  # the cap plays no part here
    model = train_predictor(x, y, 2, TrainConfig(steps=100, batch_size=1024, lr=0.1, device="cpu"))
    with torch.no_grad():
        prob = torch.sigmoid(model(x)).double().mean(0)
    want = p * w / (p * w + 1 - p)
    assert (prob - want).abs().max().item() < 0.03, (prob, want)
def test_tune_tau_is_largest_meeting_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 20, generator=g)
    y = torch.rand(50, 20, generator=g) < 0.3
    for target in (0.5, 0.9, 0.95, 1.0):
        tau = tune_tau(logits, y, target)
        probs = torch.sigmoid(logits)
        cands = sorted(set(probs.flatten().tolist()))
        ok = [t for t in cands if float((probs[y] >= t).float().mean()) >= target]
        assert tau == pytest.approx(max(ok), abs=0)


def test_tune_top_k_is_smallest_meeting_target():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 16, generator=g)
    y = torch.rand(40, 16, generator=g) < 0.4
    for target in (0.5, 0.8, 0.95, 1.0):
        k = tune_top_k(logits, y, target)
        recalls = [recall_sparsity(predicted_mask(logits, top_k=kk), y)[0] for kk in range(17)]
        assert k == min(kk for kk, r in enumerate(recalls) if r >= target)


def test_rank_budget():
    H, I = 576, 1536
    r = max_rank(H, I, 3 * H * I, 0.1)
    assert LowRankPredictor.num_params(H, r, I) <= 0.1 * 3 * H * I
    assert LowRankPredictor.num_params(H, r + 1, I) > 0.1 * 3 * H * I
    assert candidate_ranks(125) == [31, 62, 125]
    assert candidate_ranks(10) == [10]
