"""Per-layer CETT allocation and the perplexity-budget search on synthetic curves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hotcold.profiler.search import allocate, search
from hotcold.profiler.stats import CettCurve


def curve(power: float, scale: float, points: int = 9) -> CettCurve:
    """A concave sparsity-vs-CETT curve s = min(1, scale * c^power) on a grid of CETT values."""
    c = torch.linspace(0, 0.4, points, dtype=torch.float64)
    s = (scale * c**power).clamp(max=1.0)
    return CettCurve(thresholds=c * 10, cett=c, sparsity=s)


CURVES = [curve(0.3, 1.2), curve(0.8, 2.0), curve(0.5, 1.0)]


def test_uniform_allocation_reads_each_curve():
    a = allocate(CURVES, 0.1, "uniform")
    assert a.targets == [0.1] * 3
    assert a.thresholds == [c.threshold(0.1) for c in CURVES]
    assert a.sample_sparsity == [c.sparsity_at(0.1) for c in CURVES]


@pytest.mark.parametrize("weights", [None, [1.0, 5.0, 0.5]])
@pytest.mark.parametrize("mean_c", [0.05, 0.1, 0.2, 0.3])
def test_per_layer_allocation_is_optimal_for_its_cost(mean_c, weights):
    a = allocate(CURVES, mean_c, "per-layer", weights)
    assert sum(a.targets) / 3 <= mean_c + 1e-12
    w = weights or [1.0] * 3
    spent = sum(wl * c**2 for wl, c in zip(w, a.targets))
    # brute force over all grid combinations whose predicted cost sum_l w_l c_l^2 is no larger
    best = max(
        sum(float(c.sparsity[i]) for c, i in zip(CURVES, combo))
        for combo in itertools.product(range(9), repeat=3)
        if sum(wl * float(c.cett[i]) ** 2 for wl, c, i in zip(w, CURVES, combo)) <= spent + 1e-12
    )
    assert sum(a.sample_sparsity) == pytest.approx(best)


def test_sensitive_layers_get_smaller_targets():
    same = [curve(0.5, 1.5)] * 3
    a = allocate(same, 0.1, "per-layer", [1.0, 10.0, 1.0])
    assert a.targets[1] < a.targets[0] == a.targets[2]


def test_search_finds_largest_feasible_knob():
    # perplexity increase 0.3 * c^2 (uniform) -> the budget 1% is met up to c* = sqrt(0.01 / 0.3)
    dense = 10.0
    calls = []

    def evaluate(alloc):
        c = alloc.mean_cett
        calls.append(c)
        return dense * (1 + 0.3 * c**2), alloc.mean_sparsity

    res = search(CURVES, evaluate, dense, 0.01, strategies=("uniform",), max_evals=8)
    c_star = math.sqrt(0.01 / 0.3)
    best = res.best["uniform"]
    assert best is not None and best.feasible
    assert c_star / 1.1 <= best.mean_cett <= c_star
    assert len(calls) <= 8 and len(res.points) == len(calls)
    assert all(p.feasible == (p.increase <= 0.01) for p in res.points)


def test_search_with_nothing_feasible():
    res = search(CURVES, lambda a: (20.0, a.mean_sparsity), 10.0, 0.01, strategies=("uniform",), max_evals=20)
    assert res.best["uniform"] is None and res.chosen is None
    assert min(p.mean_cett for p in res.points) >= 0.002 / 2
