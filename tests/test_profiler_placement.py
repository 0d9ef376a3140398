"""Placement: optimal against brute force and scipy's MILP; extremes; per-layer minimum; dense bytes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from hotcold.engine.errors import HotcoldError
from hotcold.engine.placement import dense_parts, neuron_bytes, parse_memory, place_neurons
from hotcold.kernels import qrows


def _value(freqs, hot_ids) -> float:
    return float(sum(f[ids].sum() for f, ids in zip(freqs, hot_ids)))


def brute_force(freqs, costs, budget, mins) -> float:
    """Best total frequency over every subset of neurons (small instances)."""
    items = [(l, i) for l, f in enumerate(freqs) for i in range(len(f))]
    best = -1.0
    for mask in itertools.product([0, 1], repeat=len(items)):
        chosen = [it for it, m in zip(items, mask) if m]
        if sum(costs[l] for l, _ in chosen) > budget:
            continue
        if any(sum(1 for l, _ in chosen if l == layer) < mins[layer] for layer in range(len(freqs))):
            continue
        best = max(best, sum(float(freqs[l][i]) for l, i in chosen))
    return best


def milp_optimum(freqs, costs, budget, mins) -> float:
    f = np.concatenate([fr.numpy() for fr in freqs])
    layer = np.concatenate([[l] * len(fr) for l, fr in enumerate(freqs)])
    w = np.array([costs[l] for l in layer], dtype=float)
    cons = [LinearConstraint(w[None, :], -np.inf, budget)]
    for l in range(len(freqs)):
        if mins[l]:
            cons.append(LinearConstraint((layer == l).astype(float)[None, :], mins[l], np.inf))
    res = milp(-f, constraints=cons, integrality=np.ones_like(f), bounds=Bounds(0, 1))
    assert res.success
    return -res.fun


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 4, 3]
    freqs = [torch.rand(n, generator=g, dtype=torch.float64) for n in sizes]
    cost = 5
    budget = int(torch.randint(0, 11, (1,), generator=g)) * cost + int(torch.randint(0, cost, (1,), generator=g))
    mins = [0, 1, 0] if seed % 2 else [0, 0, 0]
    place = place_neurons(freqs, [cost] * 3, budget, mins)
    assert _value(freqs, place.hot_ids) == pytest.approx(brute_force(freqs, [cost] * 3, budget, mins))
    assert place.hot_bytes <= budget
    for f, ids in zip(freqs, place.hot_ids):  # hot ids come most frequent first
        assert torch.all(f[ids][:-1] >= f[ids][1:])


@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_milp_equal_costs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    freqs = [torch.rand(40, generator=g, dtype=torch.float64) ** 3 for _ in range(6)]
    costs = [12] * 6
    mins = [5, 0, 0, 8, 0, 0]
    budget = 12 * 97 + 7
    place = place_neurons(freqs, costs, budget, mins)
    assert _value(freqs, place.hot_ids) == pytest.approx(milp_optimum(freqs, costs, budget, mins), rel=1e-9)
    assert all(c >= m for c, m in zip(place.hot_counts, mins))


def test_unequal_costs_within_one_neuron_of_milp():
    g = torch.Generator().manual_seed(7)
    freqs = [torch.rand(30, generator=g, dtype=torch.float64) for _ in range(4)]
    costs = [7, 11, 7, 13]
    budget = 400
    place = place_neurons(freqs, costs, budget, 0)
    best = milp_optimum(freqs, costs, budget, [0] * 4)
    assert place.hot_bytes <= budget
    assert best - max(float(f.max()) for f in freqs) <= _value(freqs, place.hot_ids) <= best + 1e-9


def test_extremes_and_minimum():
    freqs = [torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.2, 0.3])]
    everything = place_neurons(freqs, [4, 4], None)
    assert everything.hot_counts == [3, 2] and everything.cold_bytes == 0
    assert everything.hot_ids[0].tolist() == [2, 0, 1]
    assert place_neurons(freqs, [4, 4], 10**9).hot_counts == [3, 2]
    nothing = place_neurons(freqs, [4, 4], 0)
    assert nothing.hot_counts == [0, 0] and nothing.hot_bytes == 0 and nothing.cold_bytes == 20
    with pytest.raises(HotcoldError, match="per-layer minimum"):
        place_neurons(freqs, [4, 4], 7, min_per_layer=1)
    forced = place_neurons(freqs, [4, 4], 8, min_per_layer=1)  # without the minimum: ids 2 and 0
    assert forced.hot_ids[0].tolist() == [2] and forced.hot_ids[1].tolist() == [1]


def test_parse_memory():
    assert parse_memory("8GiB") == 8 * 1024**3
    assert parse_memory("512 MiB") == 512 * 1024**2
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("0") == 0
    assert parse_memory("all") is None
    with pytest.raises(HotcoldError):
        parse_memory("eight gigs")


def test_neuron_bytes():
    assert neuron_bytes(576, gated=True, bias=False, dtype_bytes=2) == 3 * 576 * 2
    assert neuron_bytes(64, gated=False, bias=True, dtype_bytes=4) == (2 * 64 + 1) * 4


def test_dense_parts_match_checkpoint(tiny_checkpoint):
    """Every non-FFN tensor of the checkpoint, counted once (the tied lm_head is the embedding)."""
    from safetensors import safe_open

    from hotcold.engine.loader import load_model

    path = tiny_checkpoint("llama")
    loaded = load_model(str(path), dtype="float32")
    cfg = loaded.config
    numel = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".mlp." not in name:
                numel += int(np.prod(f.get_slice(name).get_shape()))
    parts = dense_parts(loaded.model, 2, predictor_params=100, context=64, batch=3)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 64 * 3 * 2
    assert parts["kv_cache"] == kv
    assert parts["predictors"] == 400  # float32, as the predictors run, whatever the weights' dtype
    assert sum(parts.values()) - kv - 400 == numel * 2


def test_replan_at_start_takes_the_most_frequent_neurons_that_fit(tiny_checkpoint):
    """--gpu-memory at serve time: the plan's own frequencies, the dense parts and KV cache first, then exactly
    as many neurons as the rest holds, by frequency (checked by sorting here); too small a budget is one line."""
    from test_hybrid import make_plan

    from hotcold.engine.loader import load_model
    from hotcold.engine.placement import replan

    loaded = load_model(tiny_checkpoint("relu_llama"), dtype="float32")
    cfg = loaded.config
    plan = make_plan(loaded, "random")
    gen = torch.Generator().manual_seed(0)
    for lp in plan.layers:
        lp.frequency = torch.rand(cfg.intermediate_size, generator=gen)
    reserved = sum(dense_parts(loaded.model, 2, 0, 64, 2).values())
    per = neuron_bytes(cfg.hidden_size, True, False, 2)
    placed = replan(plan, loaded.model, reserved + 37 * per + per // 2, 2, context=64, batch=2)
    assert placed.reserved == reserved and sum(len(lp.hot_ids) for lp in plan.layers) == 37
    everything = torch.cat([lp.frequency for lp in plan.layers])
    chosen = torch.cat([lp.frequency[lp.hot_ids] for lp in plan.layers])
    assert torch.equal(chosen.sort().values, everything.sort().values[-37:])
    with pytest.raises(HotcoldError, match="smaller than the dense parts"):
        replan(plan, loaded.model, reserved - 1, 2, context=64, batch=2)
    replan(plan, loaded.model, 0, 2, context=64, batch=2)
    assert all(len(lp.hot_ids) == 0 for lp in plan.layers)


def test_quantized_model_counts_the_bytes_its_gpu_side_holds(tiny_checkpoint):
    """--gpu-memory on a model kept in GGUF blocks: a neuron costs the quantized rows the quantized hybrid
    really puts on its GPU side, and the dense parts the quantized rows they become there (both measured on
    those tensors, after the move), less than the float model's."""
    from test_hybrid import make_plan

    from hotcold.engine.hybrid import HybridConfig, apply_hybrid, move_dense_parts
    from hotcold.engine.loader import load_model
    from hotcold.engine.placement import model_neuron_bytes

    path = tiny_checkpoint("llama")
    floats = load_model(str(path), dtype="float32", activation="reglu")
    for qtype in ("q4_0", "q4_1", "q8_0"):
        loaded = load_model(str(path), quantize=qtype, activation="reglu")
        planned = dense_parts(loaded.model, 2, 0, 64, 2)
        per = model_neuron_bytes(loaded.model, 2)
        move_dense_parts(loaded.model, torch.device("cpu"), torch.bfloat16)  # what goes to a GPU side
        assert isinstance(loaded.model.layers[0].attn.wqkv, qrows.QRows)
        assert dense_parts(loaded.model, 2, 0, 64, 2) == planned  # now counted on the rows themselves
        assert planned["attention"] < dense_parts(floats.model, 2, 0, 64, 2)["attention"]
        apply_hybrid(loaded.model, make_plan(loaded, "all"), HybridConfig(mode="oracle", backend="reference"),
                     loaded.fingerprint, gpu_device="cpu")
        ffn = loaded.model.layers[0].ffn
        held = sum(t.nbytes for t in (ffn.hot_up, ffn.hot_gate, ffn.hot_down))
        assert per * ffn.num_hot == held and per < neuron_bytes(loaded.config.hidden_size, True, False, 2)
