"""Predictors: a synthetic low-rank rule is learnt to its recall target; tau/top-k tuning vs brute force."""

from __future__ import annotations

import math

import pytest
import torch

from hotcold.engine.sparsity import LowRankPredictor, predicted_mask
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


def test_standardisation_folded_into_first_layer():
    x, y = synthetic(512, seed=3)
    model = train_predictor(x, y, 4, TrainConfig(steps=5))
    ref = LowRankPredictor.from_weights(model.export())
    assert torch.allclose(ref(x), model(x))
    # the exported weights act on raw inputs: a shifted input must change the output accordingly
    assert not torch.allclose(model(x + 1.0), model(x))


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
