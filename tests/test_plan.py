"""The plan contract: round trip, layer order with 12+ layers, fingerprints, refusal of foreign plans."""

from __future__ import annotations

import json

import pytest
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.engine.plan import (
    HOT_FILE,
    PLAN_JSON,
    LayerPlan,
    Plan,
    PredictorPlan,
    compute_fingerprint,
    load_plan,
    save_plan,
)

NUM_LAYERS, H, I = 13, 8, 20


def make_plan(fingerprint: str = "abc123", predictors: bool = True) -> Plan:
    """Every layer's content is unique to its index, so a mix-up of layers 2 and 10 shows."""
    layers = []
    for i in range(NUM_LAYERS):
        g = torch.Generator().manual_seed(i)
        hot = torch.randperm(I, generator=g)[: i % 7 + 1]
        pred = None
        if predictors:
            r = 2 + i % 3
            w = {"w1": torch.randn(r, H, generator=g), "b1": torch.randn(r, generator=g),
                 "w2": torch.randn(I, r, generator=g), "b2": torch.full((I,), float(i))}
            pred = PredictorPlan(rank=r, tau=0.1 * (i % 9), top_k=i + 1, recall=0.9 + i / 1000,
                                 sparsity=i / 100, topk_recall=0.8, topk_sparsity=0.5, weights=w)
        layers.append(LayerPlan(index=i, threshold=0.01 * i, cett=0.1, sparsity=i / NUM_LAYERS, num_neurons=I,
                                hot_ids=hot, frequency=torch.rand(I, generator=g), predictor=pred))
    return Plan(fingerprint=fingerprint, layers=layers, model={"arch": "llama", "source": "tiny"},
                corpus={"description": "test"}, targets={"cett": 0.1}, placement={"hot_bytes": 1},
                perplexity={"dense": 10.0}, stats={"layers": [{"x": i} for i in range(NUM_LAYERS)]})


def test_round_trip_keeps_everything_in_layer_order(tmp_path):
    plan = make_plan()
    save_plan(plan, tmp_path)
    back = load_plan(tmp_path, fingerprint="abc123")
    assert [lp.index for lp in back.layers] == list(range(NUM_LAYERS))
    for a, b in zip(plan.layers, back.layers):
        assert torch.equal(a.hot_ids, b.hot_ids) and b.hot_ids.dtype == torch.int64
        assert torch.equal(a.frequency, b.frequency)
        assert (a.threshold, a.cett, a.sparsity, a.num_neurons) == (b.threshold, b.cett, b.sparsity, b.num_neurons)
        assert b.predictor.rank == a.predictor.rank and b.predictor.tau == a.predictor.tau
        assert b.predictor.top_k == a.predictor.top_k and b.predictor.recall == a.predictor.recall
        for k in ("w1", "b1", "w2", "b2"):
            assert torch.equal(a.predictor.weights[k], b.predictor.weights[k])
    assert back.layers[10].predictor.weights["b2"][0] == 10.0  # layer 10 stays layer 10
    assert back.layers[2].predictor.weights["b2"][0] == 2.0
    assert (back.model, back.corpus, back.targets, back.placement, back.perplexity, back.stats) == (
        plan.model, plan.corpus, plan.targets, plan.placement, plan.perplexity, plan.stats)


def test_layer_order_is_numeric_even_if_json_is_shuffled(tmp_path):
    save_plan(make_plan(predictors=False), tmp_path)
    doc = json.loads((tmp_path / PLAN_JSON).read_text())
    doc["layers"] = sorted(doc["layers"], key=lambda d: str(d["index"]))  # "10" < "2" as strings
    assert [d["index"] for d in doc["layers"]][:4] == [0, 1, 10, 11]
    (tmp_path / PLAN_JSON).write_text(json.dumps(doc))
    back = load_plan(tmp_path)
    assert [lp.index for lp in back.layers] == list(range(NUM_LAYERS))
    for i, lp in enumerate(back.layers):
        assert lp.threshold == pytest.approx(0.01 * i)
        assert lp.hot_count == i % 7 + 1
        assert lp.predictor is None


def test_foreign_plan_refused(tmp_path):
    save_plan(make_plan("aaaa"), tmp_path)
    with pytest.raises(HotcoldError, match="different model"):
        load_plan(tmp_path, fingerprint="bbbb")
    plan = load_plan(tmp_path)
    with pytest.raises(HotcoldError, match="different model"):
        plan.check_model("bbbb")
    plan.check_model("aaaa")


def test_damaged_or_missing_plans(tmp_path):
    with pytest.raises(HotcoldError, match="not a plan folder"):
        load_plan(tmp_path)
    save_plan(make_plan(), tmp_path)
    doc = json.loads((tmp_path / PLAN_JSON).read_text())
    (tmp_path / PLAN_JSON).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(HotcoldError, match="version"):
        load_plan(tmp_path)
    (tmp_path / PLAN_JSON).write_text(json.dumps(doc))
    (tmp_path / HOT_FILE).unlink()
    with pytest.raises(HotcoldError, match="incomplete or damaged"):
        load_plan(tmp_path)
    (tmp_path / PLAN_JSON).write_text("{not json")
    with pytest.raises(HotcoldError, match="not valid JSON"):
        load_plan(tmp_path)


def test_fingerprint_sensitivity():
    cfg = {"hidden_size": 8, "num_layers": 2, "activation": "swiglu"}
    tensors = {"a.weight": ((8, 4), "F32"), "b.weight": ((4,), "Q4_1")}
    fp = compute_fingerprint(cfg, tensors)
    assert fp == compute_fingerprint(dict(reversed(list(cfg.items()))), dict(reversed(list(tensors.items()))))
    assert fp != compute_fingerprint({**cfg, "activation": "relu"}, tensors)
    assert fp != compute_fingerprint(cfg, {**tensors, "a.weight": ((4, 8), "F32")})
    assert fp != compute_fingerprint(cfg, {**tensors, "b.weight": ((4,), "F16")})
    assert fp != compute_fingerprint(cfg, {"a.weight": ((8, 4), "F32"), "c.weight": ((4,), "Q4_1")})
    assert compute_fingerprint(cfg, {"x": (torch.Size([2]), torch.float32)}) == \
        compute_fingerprint(cfg, {"x": ((2,), "float32")})


def test_loaded_model_fingerprint_is_plan_fingerprint(tiny_checkpoint):
    """The loader's fingerprint is compute_fingerprint of (config without bos/eos ids, checkpoint tensors)."""
    from hotcold.engine.loader import load_model

    loaded = load_model(str(tiny_checkpoint("relu_llama")), dtype="float32")
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k not in ("eos_token_ids", "bos_token_id")}
    assert compute_fingerprint(cfg, loaded.tensors) == loaded.fingerprint
    other = load_model(str(tiny_checkpoint("llama")), dtype="float32")
    assert other.fingerprint != loaded.fingerprint
