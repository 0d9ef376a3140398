"""CETT and streamed statistics against float64 brute force and direct counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hotcold.profiler.stats import (
    CettSample,
    LayerCounter,
    coactivation_gap,
    exact_cett_curve,
    hot_cdf,
    mean_cett,
)


def brute_cett(h: np.ndarray, down_t: np.ndarray, t: float) -> float:
    """Definition, token by token, in float64: ||sum_{mag <= t} h_i d_i|| / ||sum_i h_i d_i||.
    (t is widened by 1e-9 relative: numpy and torch may round a magnitude differently in the last bit.)"""
    t = t * (1 + 1e-9)
    norms = np.linalg.norm(down_t, axis=1)
    vals = []
    for row in h:
        full = np.linalg.norm(row @ down_t)
        dropped = np.abs(row) * norms <= t
        err = np.linalg.norm((row * dropped) @ down_t)
        vals.append(0.0 if full == 0 else err / full)
    return float(np.mean(vals))


def brute_threshold(h: np.ndarray, down_t: np.ndarray, target: float) -> float:
    """Largest candidate threshold (0 or any magnitude) with mean CETT <= target."""
    mags = np.abs(h) * np.linalg.norm(down_t, axis=1)
    cands = np.unique(np.concatenate([[0.0], mags.ravel()]))
    ok = [t for t in cands if brute_cett(h, down_t, t) <= target + 1e-12]
    return float(max(ok))


def _data(seed: int, T: int, I: int, H: int, relu: bool = False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, I, generator=g, dtype=torch.float64) * torch.rand(I, generator=g, dtype=torch.float64)
    if relu:
        h = h.clamp_min(0)
    d = torch.randn(I, H, generator=g, dtype=torch.float64) / H**0.5
    return h, d


def test_mean_cett_matches_definition():
    h, d = _data(0, 20, 12, 6)
    for t in (0.0, 0.05, 0.2, 0.5, 10.0):
        assert mean_cett(h, d, t) == pytest.approx(brute_cett(h.numpy(), d.numpy(), t), abs=1e-12)


def test_exact_curve_matches_brute_force_everywhere():
    h, d = _data(1, 12, 10, 5)
    m, c = exact_cett_curve(h, d)
    for k in range(0, len(m), 7):
        assert float(c[k]) == pytest.approx(brute_cett(h.numpy(), d.numpy(), float(m[k])), abs=1e-10)


@pytest.mark.parametrize("target", [0.0, 0.02, 0.1, 0.2, 0.45])
def test_threshold_search_exact_grid_matches_brute_force(target):
    h, d = _data(2, 16, 12, 6)
    sample = CettSample(h, d, bands=10_000)  # the grid holds every magnitude
    assert sample.threshold(target) == pytest.approx(brute_threshold(h.numpy(), d.numpy(), target), rel=1e-12)


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2])
def test_threshold_search_refined_in_band_matches_brute_force(target):
    # a coarse grid (8 bands over 960 pairs): the answer comes from the pair-by-pair refinement
    h, d = _data(3, 40, 24, 8)
    sample = CettSample(h, d, bands=8)
    t = sample.threshold(target)
    assert t == pytest.approx(brute_threshold(h.numpy(), d.numpy(), target), rel=1e-12)
    assert mean_cett(h, d, t) <= target + 1e-12


def test_relu_target_zero_gives_zero_threshold():
    h, d = _data(4, 30, 20, 8, relu=True)
    assert (h == 0).any()
    assert CettSample(h, d, bands=16).threshold(0.0) == 0.0
    assert CettSample(h, d, bands=16).sparsity_of(0.0) == pytest.approx(float((h == 0).double().mean()))


def test_curve_sparsity_is_fraction_dropped():
    h, d = _data(5, 30, 20, 8)
    s = CettSample(h, d, bands=12)
    mags = (h.abs() * d.norm(dim=1)).numpy()
    for t, sp, c in zip(s.curve.thresholds.tolist(), s.curve.sparsity.tolist(), s.curve.cett.tolist()):
        assert sp == pytest.approx(float((mags <= t * (1 + 1e-9)).mean()))
        assert c == pytest.approx(brute_cett(h.numpy(), d.numpy(), t), abs=1e-10)


def test_float32_curve_close_to_float64():
    h, d = _data(6, 64, 48, 16)
    s64 = CettSample(h, d, bands=32)
    s32 = CettSample(h.float(), d.float(), bands=32)
    assert torch.allclose(s64.curve.cett, s32.curve.cett, atol=1e-5)


# ----------------------------------------------------------------------------------------- counting


def _direct_counts(seqs: list[np.ndarray], window: int):
    """Every statistic by plain loops over tokens."""
    n_tok = sum(len(s) for s in seqs)
    I = seqs[0].shape[1]
    freq = sum(s.sum(0) for s in seqs) / n_tok
    shared = act = wshared = wact = union = windows = 0
    for s in seqs:
        for t in range(len(s)):
            if t >= 1:
                shared += (s[t] & s[t - 1]).sum()
                act += s[t].sum()
            if t >= window:
                seen = s[t - window:t].any(0)
                wshared += (seen & s[t]).sum()
                wact += s[t].sum()
            if t >= window - 1:
                union += s[t - window + 1: t + 1].any(0).sum()
                windows += 1
    return freq, shared / act, wshared / wact, union / (windows * I)


def test_layer_counter_matches_direct_counting():
    rng = np.random.default_rng(0)
    I, window = 24, 4
    rates = rng.uniform(0.05, 0.6, I)
    seqs = [rng.random((n, I)) < rates for n in (17, 3, 30, 9)]
    counter = LayerCounter(I, window=window, coactivation_tokens=10_000)
    for s in seqs:
        counter.update(torch.from_numpy(s))
    summ = counter.summary()
    freq, reuse, wreuse, density = _direct_counts(seqs, window)
    assert np.allclose(summ.frequency.numpy(), freq)
    assert summ.reuse_consecutive == pytest.approx(reuse)
    assert summ.reuse_window == pytest.approx(wreuse)
    assert summ.window_density == pytest.approx(density)
    assert summ.sparsity == pytest.approx(1 - freq.mean())
    allm = np.concatenate(seqs).astype(np.float64)
    assert np.allclose(counter.coact.numpy(), allm.T @ allm)


def test_coactivation_gap_by_hand():
    # neurons 0,1 always together; 2 independent-ish; P(j|i) computed by hand
    masks = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    c = masks.T @ masks
    # k = 1 (top_fraction * 2 rounds to 1 with top_fraction=0.5)
    # i=0: P(1|0)=1, P(2|0)=1/3 -> top 1, mean 2/3 -> gap 1/3; same for i=1
    # i=2: P(0|2)=1/3, P(1|2)=1/3 -> gap 0
    assert coactivation_gap(c, top_fraction=0.5, min_count=1) == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)


def test_hot_cdf_and_neurons_serving():
    freq = torch.tensor([0.1, 0.5, 0.0, 0.4], dtype=torch.float64)
    x, y = hot_cdf(freq, points=5)
    assert x.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert y.tolist() == pytest.approx([0, 0.5, 0.9, 1.0, 1.0])
    counter = LayerCounter(4)
    counter.count = freq * 10
    counter.tokens = 10
    s = counter.summary()
    assert s.neurons_serving(0.5) == 0.25
    assert s.neurons_serving(0.8) == 0.5
    assert s.neurons_serving(0.95) == 0.75
