"""Activation statistics of one FFN layer: CETT thresholds ("ReLU² Wins", Algorithm 1) and streamed counts.

Conventions used everywhere in hotcold:
- the *magnitude* of neuron i on a token is |h_i| * ||down_t[i]||_2 (the norm of its output contribution);
- a threshold t makes neuron i *inactive* iff its magnitude <= t, so t = 0 drops exactly the zeros
  (a ReLU-family model with a CETT target of 0 gets t = 0);
- CETT(t) on a token = ||sum_{i inactive} h_i down_t[i]|| / ||sum_i h_i down_t[i]|| (down bias excluded),
  0 for a token whose FFN output is exactly zero; the layer's CETT is the mean over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def magnitudes(h: Tensor, down_norm: Tensor) -> Tensor:
    """Output magnitude of every neuron on every token: [T, I]."""
    return h.abs() * down_norm


def mean_cett(h: Tensor, down_t: Tensor, threshold: float) -> float:
    """Mean CETT of one threshold, computed directly (one masked matmul)."""
    mags = magnitudes(h, down_t.norm(dim=1))
    full = (h @ down_t).norm(dim=1)
    err = ((h * (mags <= threshold)) @ down_t).norm(dim=1)
    ratio = torch.where(full > 0, err / full.clamp_min(torch.finfo(full.dtype).tiny), torch.zeros_like(full))
    return float(ratio.mean())


@dataclass
class CettCurve:
    """Mean CETT of one layer at a grid of thresholds, measured on a token sample.

    `thresholds` ascend from 0; `cett[k]` and `sparsity[k]` are the mean CETT and the fraction of inactive
    (token, neuron) pairs when every pair with magnitude <= thresholds[k] is dropped."""

    thresholds: Tensor  # float64 [K]
    cett: Tensor  # float64 [K]
    sparsity: Tensor  # float64 [K]

    def index(self, target: float) -> int:
        """Index of the largest grid threshold whose mean CETT <= target (index 0, t = 0, always qualifies:
        it drops only pairs that contribute nothing)."""
        ok = torch.nonzero(self.cett <= target + 1e-12).flatten()
        return int(ok[-1]) if len(ok) else 0

    def threshold(self, target: float) -> float:
        return float(self.thresholds[self.index(target)])

    def sparsity_at(self, target: float) -> float:
        return float(self.sparsity[self.index(target)])


def _last_of_runs(m: Tensor) -> Tensor:
    """Mask of the last element of each run of equal values in an ascending tensor."""
    last = torch.ones_like(m, dtype=torch.bool)
    last[:-1] = m[1:] != m[:-1]
    return last


def _pair_curve(h: Tensor, down_t: Tensor, mags: Tensor, full: Tensor, base: Tensor, pairs: Tensor,
                num_tokens: int) -> tuple[Tensor, Tensor]:
    """Exact mean-CETT increase as the (token, neuron) `pairs` [P, 2] are dropped in order of magnitude on
    top of the per-token dropped sums `base` [T, H]. Returns (magnitudes ascending, mean CETT increase up to
    and including each pair); ties are kept, read a tie's value at its last pair. Costs O(P * H)."""
    if len(pairs) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    tok, neu = pairs[:, 0], pairs[:, 1]
    m = mags[tok, neu].double()
    order = torch.from_numpy(np.lexsort((m.numpy(), tok.numpy())))  # by token, then magnitude
    tok, neu, m = tok[order], neu[order], m[order]
    contrib = h[tok, neu].unsqueeze(1) * down_t[neu]  # [P, H]
    cum = contrib.cumsum(0)
    first = torch.ones_like(tok, dtype=torch.bool)
    first[1:] = tok[1:] != tok[:-1]
    seg_start = torch.nonzero(first).flatten()
    seg_id = first.long().cumsum(0) - 1
    offset = cum[seg_start] - contrib[seg_start]  # running sum before each token's first pair
    err = (cum - offset[seg_id] + base[tok]).norm(dim=1).double()
    f = full[tok].double()
    safe = f.clamp_min(1e-300)
    ratio = torch.where(f > 0, err / safe, torch.zeros_like(f))
    before = torch.where(f > 0, base[tok].norm(dim=1).double() / safe, torch.zeros_like(f))
    prev = torch.where(first, before, torch.cat([torch.zeros(1, dtype=torch.float64), ratio[:-1]]))
    g = torch.argsort(m, stable=True)
    return m[g], (ratio - prev)[g].cumsum(0) / num_tokens


class CettSample:
    """A token sample of one layer's activations h [T, I], answering CETT questions about it.

    The curve on a grid of `bands` magnitude quantiles costs one sparse matmul (each pair's contribution is
    summed into its token's band, then the bands are accumulated); `threshold(target)` then refines exactly,
    pair by pair, inside the band after the last grid point under the target. That is the exact largest
    threshold with mean CETT <= target unless the mean curve dips back under the target after a grid point
    above it (with `bands` >= the number of distinct magnitudes it is always exact)."""

    def __init__(self, h: Tensor, down_t: Tensor, bands: int = 128, token_chunk: int = 256) -> None:
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.h = h.to(dtype)
        self.down_t = down_t.to(dtype)
        self.mags = magnitudes(self.h, self.down_t.norm(dim=1))
        self.full = (self.h @ self.down_t).norm(dim=1)
        T, I = self.h.shape
        sorted_m = self.mags.flatten().double().sort().values
        pick = torch.linspace(0, len(sorted_m) - 1, bands).round().long()
        self.grid = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_m[pick]]).unique()
        band = torch.searchsorted(self.grid, self.mags.double(), right=False)  # first grid point >= m
        self.band = band.to(torch.int16)
        K = len(self.grid)
        cett = torch.zeros(K, dtype=torch.float64)
        for s in range(0, T, token_chunk):
            e = min(T, s + token_chunk)
            rows = (torch.arange(e - s).unsqueeze(1) * K + band[s:e]).flatten()
            cols = torch.arange(I).repeat(e - s)
            sp = torch.sparse_coo_tensor(torch.stack([rows, cols]), self.h[s:e].flatten(), ((e - s) * K, I),
                                 check_invariants=False)
            per_band = (sp.coalesce() @ self.down_t).view(e - s, K, -1)
            err = per_band.cumsum(1).norm(dim=2).double()  # [c, K]
            f = self.full[s:e].double().unsqueeze(1)
            cett += torch.where(f > 0, err / f.clamp_min(1e-300), torch.zeros_like(err)).sum(0)
        counts = torch.bincount(band.flatten(), minlength=K).double().cumsum(0)
        self.curve = CettCurve(self.grid, (cett / T).clamp_min(0.0), counts / self.mags.numel())
        self._refined: dict[float, float] = {}

    def threshold(self, target: float) -> float:
        """Largest threshold with mean CETT <= target, refined exactly after the last grid point."""
        if target in self._refined:
            return self._refined[target]
        t = self._refine(target)
        self._refined[target] = t
        return t

    def _refine(self, target: float) -> float:
        k = self.curve.index(target)
        if k + 1 >= len(self.grid):
            return float(self.grid[k])
        lo = float(self.grid[k])
        base = (self.h * (self.mags <= lo)) @ self.down_t
        pairs = torch.nonzero(self.band == k + 1)
        m, inc = _pair_curve(self.h, self.down_t, self.mags, self.full, base, pairs, self.h.shape[0])
        values = float(self.curve.cett[k]) + inc
        ok = torch.nonzero(_last_of_runs(m) & (values <= target + 1e-12)).flatten()
        return float(m[ok[-1]]) if len(ok) else lo

    def sparsity_of(self, threshold: float) -> float:
        """Fraction of the sample's (token, neuron) pairs a threshold makes inactive."""
        return float((self.mags <= threshold).double().mean())

    def cett_of(self, threshold: float) -> float:
        return mean_cett(self.h, self.down_t, threshold)


def exact_cett_curve(h: Tensor, down_t: Tensor) -> tuple[Tensor, Tensor]:
    """(every distinct magnitude, mean CETT when dropping all pairs <= it), exact; O(T*I*H) memory, so for
    small samples."""
    h, down_t = h.double(), down_t.double()
    mags = magnitudes(h, down_t.norm(dim=1))
    full = (h @ down_t).norm(dim=1)
    pairs = torch.nonzero(torch.ones_like(h, dtype=torch.bool))
    base = torch.zeros(h.shape[0], down_t.shape[1], dtype=torch.float64)
    m, inc = _pair_curve(h, down_t, mags, full, base, pairs, h.shape[0])
    last = _last_of_runs(m)
    return m[last], inc[last].clamp_min(0.0)


def threshold_for_target(h: Tensor, down_t: Tensor, target: float, bands: int = 128) -> float:
    """The largest threshold whose mean CETT over the sample h is <= target."""
    return CettSample(h, down_t, bands=bands).threshold(target)


# ----------------------------------------------------------------------------------------- streamed counts


@dataclass
class LayerSummary:
    """What the streamed pass learned about one layer at its threshold."""

    tokens: int
    frequency: Tensor  # float64 [I]: fraction of tokens on which each neuron is active
    sparsity: float  # fraction of inactive (token, neuron) pairs
    reuse_consecutive: float  # |A_t ∩ A_{t-1}| / |A_t|, summed over tokens
    reuse_window: float  # share of A_t already active in one of the previous `window` tokens
    window_density: float  # |A_{t-w+1} ∪ ... ∪ A_t| / I, averaged (1 - aggregated sparsity)
    coactivation_gap: float  # mean over neurons of top-k average P(j|i) minus the average P(j|i)

    def hot_cdf(self, points: int = 101) -> tuple[Tensor, Tensor]:
        """(fraction of neurons, fraction of activations they serve), neurons taken hottest first."""
        return hot_cdf(self.frequency, points)

    def neurons_serving(self, share: float) -> float:
        """Smallest fraction of neurons (hottest first) that serve `share` of all activations."""
        f = self.frequency.sort(descending=True).values
        total = float(f.sum())
        if total <= 0:
            return 0.0
        k = int(torch.searchsorted(f.cumsum(0) / total, torch.tensor([share - 1e-12], dtype=f.dtype)))
        return min(k + 1, len(f)) / len(f)


def hot_cdf(frequency: Tensor, points: int = 101) -> tuple[Tensor, Tensor]:
    f = frequency.double().sort(descending=True).values
    total = float(f.sum())
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), f.cumsum(0) / max(total, 1e-300)])
    idx = torch.linspace(0, len(f), points).round().long()
    return idx.double() / len(f), cum[idx]


class LayerCounter:
    """Streams active masks of one layer, one sequence at a time, keeping only O(I + I^2) state.

    Reuse and window statistics never cross a sequence boundary; co-activation counts stop after
    `coactivation_tokens` tokens (an I x I matmul per token is the costliest count)."""

    def __init__(self, num_neurons: int, window: int = 8, coactivation_tokens: int = 8192) -> None:
        self.num_neurons = num_neurons
        self.window = window
        self.coactivation_tokens = coactivation_tokens
        self.tokens = 0
        self.count = torch.zeros(num_neurons, dtype=torch.float64)
        self.consecutive = [0.0, 0.0]  # shared, active (tokens with a predecessor)
        self.windowed = [0.0, 0.0]  # seen in previous window, active (tokens with a full history)
        self.union = [0.0, 0.0]  # union size, windows counted
        self.coact = torch.zeros(num_neurons, num_neurons, dtype=torch.float32)
        self.coact_tokens = 0

    def update(self, active: Tensor) -> None:
        """active: bool [L, I] for L consecutive tokens of one sequence."""
        a = active.bool()
        L = a.shape[0]
        if L == 0:
            return
        self.tokens += L
        self.count += a.sum(0, dtype=torch.float64)
        if L > 1:
            self.consecutive[0] += float((a[1:] & a[:-1]).sum())
            self.consecutive[1] += float(a[1:].sum())
        w = self.window
        cs = torch.cat([torch.zeros(1, a.shape[1], dtype=torch.int32), a.int().cumsum(0, dtype=torch.int32)])
        if L > w:  # token t (t >= w) against tokens t-w .. t-1
            seen = (cs[w:L] - cs[0:L - w]) > 0
            self.windowed[0] += float((seen & a[w:]).sum())
            self.windowed[1] += float(a[w:].sum())
        if L >= w:  # windows t-w+1 .. t
            union = (cs[w:] - cs[:-w]) > 0
            self.union[0] += float(union.sum())
            self.union[1] += union.shape[0]
        room = self.coactivation_tokens - self.coact_tokens
        if room > 0:
            m = a[:room].float()
            self.coact += m.T @ m
            self.coact_tokens += m.shape[0]

    def summary(self, top_fraction: float = 0.01, min_count: int = 5) -> LayerSummary:
        n = max(self.tokens, 1)
        return LayerSummary(
            tokens=self.tokens,
            frequency=self.count / n,
            sparsity=1.0 - float(self.count.sum()) / (n * self.num_neurons),
            reuse_consecutive=_ratio(*self.consecutive),
            reuse_window=_ratio(*self.windowed),
            window_density=_ratio(self.union[0], self.union[1] * self.num_neurons),
            coactivation_gap=coactivation_gap(self.coact, top_fraction, min_count),
        )


def coactivation_gap(coact: Tensor, top_fraction: float = 0.01, min_count: int = 5) -> float:
    """Mean over neurons i (active >= min_count times) of [mean of the top-k P(j|i)] - [mean P(j|i)], j != i,
    with P(j|i) = C_ij / C_ii and k = max(1, round(top_fraction * (I - 1))). Large when neurons fire in
    tight groups (what bundling and prediction exploit); 0 when they fire independently at equal rates."""
    c = coact.double()
    n = c.shape[0]
    if n < 2:
        return 0.0
    diag = c.diagonal().clone()
    rows = diag >= min_count
    if not bool(rows.any()):
        return 0.0
    p = c[rows] / diag[rows].unsqueeze(1)
    p[torch.arange(p.shape[0]), torch.nonzero(rows).flatten()] = float("nan")  # exclude j == i
    k = max(1, round(top_fraction * (n - 1)))
    p_no_self = torch.nan_to_num(p, nan=-1.0)
    top = p_no_self.topk(k, dim=1).values.mean(1)
    avg = torch.nan_to_num(p, nan=0.0).sum(1) / (n - 1)
    return float((top - avg).mean())


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan
