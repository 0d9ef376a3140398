"""Quality-targeted thresholds: the largest sparsity whose held-out perplexity stays within a budget.

Two ways to turn one knob, the mean CETT target c over layers, into per-layer targets:
- uniform: every layer gets c;
- per-layer: the allocation maximising the summed sparsity for a predicted quality cost
  sum_l w_l * c_l^2, read off the layers' CETT-vs-sparsity curves: layer l takes the grid point maximising
  s_l(c_l) - lambda * w_l * c_l^2, with lambda bisected so that the mean of the c_l is c. w_l is the layer's
  measured sensitivity (KL divergence from the dense model when that layer alone is sparsified, divided by
  its CETT squared: errors of small relative size cost quadratically). On the default model the first and
  last layers are sparse but 10-40x more sensitive than the middle ones, so they get smaller targets.
For each, a bracketing search over c (a quadratic prior first, then log-log interpolation inside the
bracket) evaluates held-out perplexity with the oracle thresholds and keeps the largest feasible c. Every
evaluation is recorded: the report plots the curve it walked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hotcold.profiler.stats import CettCurve

STRATEGIES = ("uniform", "per-layer")


@dataclass
class Allocation:
    strategy: str
    mean_cett: float
    targets: list[float]  # per-layer CETT on the sample at the chosen thresholds
    thresholds: list[float]  # per-layer thresholds on the curves' grid
    sample_sparsity: list[float]  # per-layer sparsity on the CETT sample

    @property
    def mean_sparsity(self) -> float:
        return sum(self.sample_sparsity) / len(self.sample_sparsity)


def allocate(curves: list[CettCurve], mean_cett: float, strategy: str = "uniform",
             weights: list[float] | None = None) -> Allocation:
    """Per-layer grid points for a knob value; `weights` are the per-layer sensitivities (default 1)."""
    if strategy == "uniform":
        idx = [c.index(mean_cett) for c in curves]
        return _allocation(curves, idx, strategy, mean_cett)
    if strategy != "per-layer":
        raise ValueError(f"unknown allocation {strategy!r}")
    w = [1.0] * len(curves) if weights is None else [max(float(x), 1e-12) for x in weights]

    def pick(lam: float) -> list[int]:
        return [int((c.sparsity - lam * wl * c.cett**2).argmax()) for c, wl in zip(curves, w)]

    def mean_c(idx: list[int]) -> float:
        return sum(float(c.cett[i]) for c, i in zip(curves, idx)) / len(curves)

    lo, hi = 1e-6, 1e12  # mean CETT decreases as lambda grows
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if mean_c(pick(mid)) > mean_cett:
            lo = mid
        else:
            hi = mid
    return _allocation(curves, pick(hi), strategy, mean_cett)  # the side with mean CETT <= the knob


def _allocation(curves: list[CettCurve], idx: list[int], strategy: str, knob: float) -> Allocation:
    return Allocation(strategy, knob, [float(c.cett[i]) for c, i in zip(curves, idx)],
                      [float(c.thresholds[i]) for c, i in zip(curves, idx)],
                      [float(c.sparsity[i]) for c, i in zip(curves, idx)])


@dataclass
class SearchPoint:
    strategy: str
    mean_cett: float
    perplexity: float
    increase: float  # relative to dense
    sparsity: float  # measured on the held-out text
    feasible: bool


@dataclass
class SearchResult:
    budget: float
    dense_perplexity: float
    points: list[SearchPoint] = field(default_factory=list)
    best: dict[str, SearchPoint | None] = field(default_factory=dict)  # per strategy

    @property
    def chosen(self) -> SearchPoint | None:
        """The feasible point with the highest measured sparsity over all strategies."""
        cands = [p for p in self.best.values() if p is not None]
        return max(cands, key=lambda p: p.sparsity) if cands else None


Evaluate = Callable[[Allocation], tuple[float, float]]  # allocation -> (perplexity, measured sparsity)


def search(curves: list[CettCurve], evaluate: Evaluate, dense_ppl: float, budget: float,
           strategies: tuple[str, ...] = STRATEGIES, max_evals: int = 6, start: float = 0.05,
           c_min: float = 0.002, c_max: float = 0.8, on_point: Callable[[SearchPoint], None] | None = None,
           weights: list[float] | None = None) -> SearchResult:
    """For each strategy, the largest mean CETT whose perplexity increase over dense is <= budget."""
    result = SearchResult(budget, dense_ppl)
    for strategy in strategies:
        lo: tuple[float, float] | None = None  # (c, increase) feasible
        hi: tuple[float, float] | None = None  # infeasible
        best: SearchPoint | None = None
        c = start
        for _ in range(max_evals):
            ppl, sparsity = evaluate(allocate(curves, c, strategy, weights))
            inc = ppl / dense_ppl - 1.0
            point = SearchPoint(strategy, c, ppl, inc, sparsity, inc <= budget)
            result.points.append(point)
            if on_point is not None:
                on_point(point)
            if point.feasible:
                if best is None or c > best.mean_cett:
                    best = point
                lo = (c, inc) if lo is None or c > lo[0] else lo
            else:
                hi = (c, inc) if hi is None or c < hi[0] else hi
            nxt = _next(lo, hi, budget, c_min, c_max)
            if nxt is None:
                break
            c = nxt
        result.best[strategy] = best
    return result


def _next(lo, hi, budget: float, c_min: float, c_max: float) -> float | None:
    if lo is None or hi is None:  # not bracketed yet: increase ~ c^2, moved by at most 4x
        c, inc = lo if hi is None else hi
        step = math.sqrt(budget / inc) if inc > 0 else 4.0
        c = c * min(max(step, 0.25), 4.0) * (0.97 if hi is not None else 1.0)
        if hi is None and c <= lo[0] * 1.02:
            c = lo[0] * 1.1
        return c if c_min <= c <= c_max else None
    if hi[0] / lo[0] < 1.08:
        return None
    # increase ~ a * c^p between the bracket's ends: interpolate in log-log, kept inside the bracket
    a_c, a_i = lo
    b_c, b_i = hi
    t = 0.5
    if a_i > 0 and b_i > a_i:
        p = math.log(b_i / a_i) / math.log(b_c / a_c)
        if p > 0:
            t = math.log(budget / a_i) / (p * math.log(b_c / a_c))
    t = min(max(t, 0.2), 0.8)
    return a_c * (b_c / a_c) ** t
