"""A tiny random ReLU model profiled end to end; the masked FFNs against transformers with hooks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import reference_model

from hotcold.cli import main
from hotcold.engine.errors import HotcoldError
from hotcold.engine.loader import load_model
from hotcold.engine.plan import load_plan
from hotcold.engine.sparsity import apply_plan, perplexity_with_plan, restore_dense, sparsified
from hotcold.profiler.collect import FFNTap, StatsCollector, dense_ffns, replaced_ffns, run_body
from hotcold.profiler.corpus import builtin_texts

TEXT = "\n\n".join(builtin_texts()[0][:2])


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def relu_plan(tiny_checkpoint, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan"
    model = tiny_checkpoint("relu_llama")
    rc = main(["profile", "--model", str(model), "--out", str(out), "--corpus", str(corpus_file), "--tokens",
               "3000", "--eval-tokens", "400", "--cett", "0", "--predictor-steps", "60", "--quiet",
               "--gpu-memory", "200KiB", "--context", "64"])
    assert rc == 0
    return model, out


def test_profile_end_to_end(relu_plan):
    model, out = relu_plan
    plan = load_plan(out)
    loaded = load_model(str(model), dtype="float32")
    plan.check_model(loaded.fingerprint)
    cfg = loaded.config
    assert len(plan.layers) == cfg.num_layers
    assert all(lp.threshold == 0.0 for lp in plan.layers)  # ReLU family, CETT 0: only exact zeros dropped
    for lp in plan.layers:
        assert lp.predictor is not None and lp.predictor.rank >= 1
        assert 0 < lp.sparsity < 1
        assert torch.all(lp.frequency[lp.hot_ids][:-1] >= lp.frequency[lp.hot_ids][1:])
    pl = plan.placement
    assert pl["reserved_bytes"] + pl["hot_bytes"] <= 200 * 1024
    assert 0 < pl["hot_neurons"] < cfg.num_layers * cfg.intermediate_size  # the budget splits the layers
    # dropping exact zeros changes nothing: oracle perplexity equals dense
    assert plan.perplexity["oracle"] == pytest.approx(plan.perplexity["dense"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert "Held-out perplexity" in report
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("(")[-1].rstrip(")")).stat().st_size > 1000


def test_frequencies_match_direct_counting(tiny_checkpoint):
    """Activation counts of the streamed pass against transformers' own h (down_proj inputs)."""
    path = tiny_checkpoint("relu_llama")
    loaded = load_model(str(path), dtype="float32")
    ids = loaded.tokenizer.encode(TEXT)[:600]
    seqs = [ids[i: i + 100] for i in range(0, 600, 100)]
    ffns = dense_ffns(loaded.model)
    stats = StatsCollector(ffns, [0.0] * len(ffns), window=4)
    with replaced_ffns(loaded.model, lambda i, f: FFNTap(f, i, stats)):
        run_body(loaded.model, seqs, batch_tokens=250, on_batch=stats.set_lengths)

    ref = reference_model(path)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ffns))}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0][0].clone()))
             for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        for s in seqs:
            ref(torch.tensor([s]))
    for h in hooks:
        h.remove()
    for i, counter in enumerate(stats.counters):
        direct = (torch.cat(seen[i]) != 0).sum(0).double()
        assert counter.tokens == 600
        # the engine and transformers may round a gate at ~1e-7 differently: allow a stray flip or two
        assert (counter.count - direct).abs().sum() <= 2
        assert (counter.count - direct).abs().sum() < 0.001 * direct.sum()


def test_masked_ffn_matches_transformers_with_zeroed_neurons(tiny_checkpoint):
    """Oracle mode at a positive threshold: logits equal transformers' with the same neurons zeroed."""
    path = tiny_checkpoint("llama")  # SwiGLU: no exact zeros, the threshold decides
    loaded = load_model(str(path), dtype="float32")
    ids = torch.tensor(loaded.tokenizer.encode(TEXT)[:80])
    from hotcold.engine.plan import LayerPlan, Plan

    ref = reference_model(path)
    thresholds = []
    for layer in ref.model.layers:
        norms = layer.mlp.down_proj.weight.detach().double().norm(dim=0)
        thresholds.append(0.02 * float(norms.mean()))
    I = loaded.config.intermediate_size
    plan = Plan(loaded.fingerprint, [LayerPlan(i, t, 0.1, 0.5, I, torch.zeros(0, dtype=torch.long),
                                               torch.zeros(I)) for i, t in enumerate(thresholds)])

    def zero_small(i):
        norms = ref.model.layers[i].mlp.down_proj.weight.detach().norm(dim=0)
        return lambda m, a: (a[0] * (a[0].abs() * norms > thresholds[i]),)

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(zero_small(i))
             for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        dense = ref(ids[None]).logits[0]
    with sparsified(loaded.model, plan, "oracle"):
        got = loaded.model.forward_sequence(ids)
    assert torch.allclose(got, want, atol=2e-4)
    assert not torch.allclose(got, dense, atol=1e-2)  # the threshold really removed something


def test_perplexity_with_plan_and_foreign_model(relu_plan, tiny_checkpoint):
    model, out = relu_plan
    loaded = load_model(str(model), dtype="float32")
    ids = loaded.tokenizer.encode(TEXT)[:300]
    from hotcold.engine.perplexity import perplexity

    dense = perplexity(loaded.model, ids, 128)
    oracle = perplexity_with_plan(loaded, out, ids, "oracle", context=128)
    assert oracle.perplexity == pytest.approx(dense, rel=1e-5)
    assert 0 < oracle.sparsity < 1
    pred = perplexity_with_plan(loaded, out, ids, "predictor", context=128)
    assert math.isfinite(pred.perplexity) and 0 <= pred.sparsity < 1
    # the model is restored afterwards
    assert perplexity(loaded.model, ids, 128) == dense
    other = load_model(str(tiny_checkpoint("llama")), dtype="float32")
    with pytest.raises(HotcoldError, match="different model"):
        perplexity_with_plan(other, out, ids, "oracle")
    originals = apply_plan(loaded.model, load_plan(out), "predictor", "topk")
    restore_dense(loaded.model, originals)
    assert perplexity(loaded.model, ids, 128) == dense


def test_moe_refused(tiny_checkpoint, corpus_file, tmp_path, capsys):
    rc = main(["profile", "--model", str(tiny_checkpoint("mixtral")), "--out", str(tmp_path / "p"),
               "--corpus", str(corpus_file), "--tokens", "500", "--quiet"])
    assert rc == 1
    assert "mixture-of-experts" in capsys.readouterr().err


def test_bad_arguments_one_line(tiny_checkpoint, corpus_file, tmp_path, capsys):
    model = str(tiny_checkpoint("relu_llama"))
    rc = main(["profile", "--model", model, "--out", str(tmp_path / "p"), "--corpus", str(tmp_path / "nope.txt")])
    assert rc == 1 and "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    rc = main(["profile", "--model", model, "--out", str(tmp_path / "p"), "--corpus", str(bad)])
    assert rc == 1 and "text" in capsys.readouterr().err
    rc = main(["profile", "--model", model, "--out", str(tmp_path / "p"), "--corpus", str(corpus_file),
               "--gpu-memory", "lots"])
    assert rc == 1 and "memory size" in capsys.readouterr().err
    for flags, needle in [(["--context", "-5"], "--context"), (["--batch", "0"], "--batch"),
                          (["--predictor-steps", "0"], "--predictor-steps"), (["--threads", "0"], "--threads"),
                          (["--threads", "100000"], "--threads")]:  # crashed libgomp
        rc = main(["profile", "--model", model, "--out", str(tmp_path / "p"), "--corpus", str(corpus_file), *flags])
        err = capsys.readouterr().err
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1, err


def test_perplexity_budget_search(tiny_checkpoint, corpus_file, tmp_path):
    out = tmp_path / "plan"
    rc = main(["profile", "--model", str(tiny_checkpoint("llama")), "--out", str(out), "--corpus",
               str(corpus_file), "--tokens", "2000", "--eval-tokens", "400", "--max-ppl-increase", "5%",
               "--predictor-rank", "8", "--predictor-steps", "30", "--quiet", "--no-report", "--sparsity", "neuron"])
    assert rc == 0
    plan = load_plan(out)
    points = plan.stats["search"]["points"]
    assert {p["strategy"] for p in points} == {"uniform", "per-layer"}
    assert plan.targets["max_ppl_increase"] == pytest.approx(0.05)
    assert plan.perplexity["oracle"] <= plan.perplexity["dense"] * 1.05
    feasible = [p for p in points if p["feasible"]]
    if feasible:  # the plan keeps the sparsest feasible point
        assert plan.perplexity["oracle_sparsity"] == pytest.approx(max(p["sparsity"] for p in feasible))
    assert all(lp.predictor.rank == 8 for lp in plan.layers)
    assert all(st["sensitivity_kl"] is not None for st in plan.stats["layers"])
    assert not (out / "report.md").exists()
