"""`hotcold profile --sparsity input` (profiler/input_plan.py): histogram quantiles against brute force, the
greedy allocation, and a tiny model end to end, where the plan's reported perplexity is what `hotcold
perplexity --plan` measures."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_profiler_e2e import TEXT

from hotcold.cli import main
from hotcold.engine import commands_perplexity
from hotcold.engine.commands_generate import load_from_args
from hotcold.engine.errors import HotcoldError
from hotcold.engine.input_sparsity import SITES, SparseInput
from hotcold.engine.loader import load_model
from hotcold.engine.perplexity import perplexity
from hotcold.engine.plan import load_plan
from hotcold.profiler.corpus import build_corpus
from hotcold.profiler.input_plan import Histograms, InputProfileConfig, block_sparsity, profile_inputs, site_params


def test_histogram_quantiles_match_brute_force():
    """Heavy-tailed magnitudes over several decades, exact zeros included, added in pieces."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) * torch.exp(2 * torch.randn(20000, generator=gen))
    x[:1500] = 0.0
    hist = Histograms()
    for part in x.split(3000):
        hist.add(3, "o", part.view(-1, 10))
    for q in (0.01, 0.05, 0.2, 0.4, 0.5, 0.7, 0.9, 0.99):
        want = float(x.abs().quantile(q))
        got = hist.quantile(3, "o", q)
        if want == 0:  # the zeros alone reach q: threshold 0 (which drops them all)
            assert got == 0.0
            continue
        assert abs(got / want - 1) < 0.01, (q, got, want)  # within about one bin (0.34% of the value)
        assert abs(float((x.abs() <= got).float().mean()) - q) < 0.002


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_end_to_end_reported_perplexity_is_what_perplexity_measures(tiny_checkpoint, corpus_path, tmp_path):
    """Profile a quantized tiny model under a 20% budget through the CLI; then load it as `hotcold perplexity
    --plan` does: the held-out perplexity equals the plan's (same code path, same tokens), the sites drop what
    the plan says, and a budget of 0 keeps the model dense."""
    model = str(tiny_checkpoint("llama"))
    out = tmp_path / "plan"
    rc = main(["profile", "--model", model, "--quantize", "q8_0", "--out", str(out), "--corpus", str(corpus_path),
               "--tokens", "1500", "--eval-tokens", "300", "--max-ppl-increase", "20%", "--min-site-sparsity", "0",
               "--quiet"])
    assert rc == 0
    plan = load_plan(out)
    assert plan.sparsity_mode == "input" and plan.targets["sparsity"] == "input"
    assert plan.perplexity["input"] <= plan.perplexity["dense"] * 1.2
    assert plan.targets["block_sparsity"] > 0 and plan.perplexity["input_skipped"] > 0.05
    assert (out / "report.md").exists() and (out / "input_sparsity.png").exists()

    parser = argparse.ArgumentParser()
    commands_perplexity.add_arguments(parser)
    args = parser.parse_args(["--model", model, "--quantize", "q8_0", "--plan", str(out), "--text", "unused"])
    loaded = load_from_args(args)
    assert any(isinstance(layer.attn.wqkv, SparseInput) or isinstance(layer.ffn.down, SparseInput)
               for layer in loaded.model.layers)
    evals = build_corpus(loaded.tokenizer, [corpus_path], 1500, 300).evaluation
    assert len(evals) == plan.perplexity["tokens"]
    got = perplexity(loaded.model, evals, plan.perplexity["context"])
    assert got == pytest.approx(plan.perplexity["input"], rel=1e-9)
    dense = perplexity(load_model(model, quantize="q8_0").model, evals, plan.perplexity["context"])
    assert dense == pytest.approx(plan.perplexity["dense"], rel=1e-9) and got != dense

    strict = tmp_path / "strict"
    assert main(["profile", "--model", model, "--quantize", "q8_0", "--out", str(strict), "--corpus",
                 str(corpus_path), "--tokens", "1500", "--eval-tokens", "300", "--max-ppl-increase", "0",
                 "--min-site-sparsity", "0", "--quiet", "--no-report"]) == 0
    tight = load_plan(strict)
    assert tight.perplexity["input"] <= tight.perplexity["dense"]


def test_greedy_path_raises_sparsity_monotonically(tiny_checkpoint, corpus_path):
    loaded = load_model(str(tiny_checkpoint("llama")), quantize="q8_0")
    corpus = build_corpus(loaded.tokenizer, [corpus_path], 1500, 300)
    cfg = InputProfileConfig(max_ppl_increase=0.05, calibration_tokens=512, block_tokens=64, max_sparsity=0.5,
                             min_sparsity=0.0, seq_len=64, eval_context=128)
    result = profile_inputs(loaded, corpus, cfg)
    for path, block in zip(result.paths, loaded.model.layers):
        params = site_params(block)
        levels = [block_sparsity(a, params) for a in path]
        assert levels[0] == 0 and all(b > a for a, b in zip(levels, levels[1:]))
        assert levels[-1] >= 0.5 - 1e-9 and set(path[-1]) == set(SITES)
        for a, b in zip(path, path[1:]):  # one site raised by one step at a time
            raised = [s for s in SITES if b[s] != a[s]]
            assert len(raised) == 1 and b[raised[0]] == pytest.approx(a[raised[0]] + cfg.step)
    for lp in result.plan.layers:  # a threshold is the histogram's quantile: it drops about its share
        for site, t in lp.inputs.thresholds.items():
            assert t > 0 and 0 < lp.inputs.sparsity[site] < 1


def test_cli_refuses_mismatched_modes(tiny_checkpoint, corpus_path, tmp_path):
    model = str(tiny_checkpoint("llama"))
    out = tmp_path / "plan"
    assert main(["profile", "--model", model, "--out", str(out), "--corpus", str(corpus_path), "--tokens", "800",
                 "--eval-tokens", "200", "--quiet", "--no-report", "--sparsity", "input"]) == 0
    for flags in (["--sparsity", "predictor"], ["--gpu-memory", "1GiB"]):
        parser = argparse.ArgumentParser()
        commands_perplexity.add_arguments(parser)
        args = parser.parse_args(["--model", model, "--plan", str(out), "--text", "x", *flags])
        with pytest.raises(HotcoldError, match="input"):
            load_from_args(args)
    assert main(["profile", "--model", model, "--out", str(tmp_path / "p"), "--sparsity", "input", "--cett", "0.1",
                 "--corpus", str(corpus_path)]) == 1


@pytest.mark.parametrize("kind,flags", [("relu_llama", []), ("llama", ["--activation", "reglu", "--quantize", "q8_0"])])
def test_relu_model_gets_neuron_ffns_and_input_thresholds(kind, flags, tiny_checkpoint, corpus_path, tmp_path):
    """--sparsity auto on a ReLU-family model: predictors for the FFNs, input thresholds beside them (attention
    everywhere, the FFN only where the neuron plan leaves it dense: every float FFN runs the neuron plan, a
    quantized one stays dense where its predicted density does not pay); loaded as `hotcold perplexity --plan`
    loads it, both run and the held-out perplexity is the plan's."""
    from hotcold.engine.layers import QuantFFN

    model = str(tiny_checkpoint(kind))
    out = tmp_path / "plan"
    assert main(["profile", "--model", model, "--out", str(out), "--corpus", str(corpus_path), "--tokens", "1500",
                 "--eval-tokens", "300", "--max-ppl-increase", "30%", "--min-site-sparsity", "0",
                 "--predictor-steps", "30", "--quiet", "--gpu-memory", "0", *flags]) == 0
    plan = load_plan(out)
    assert "Input thresholds beside the predictors" in (out / "report.md").read_text()
    assert plan.sparsity_mode == "predictor" and all(lp.predictor is not None for lp in plan.layers)
    assert any(lp.inputs.thresholds for lp in plan.layers)
    parser = argparse.ArgumentParser()
    commands_perplexity.add_arguments(parser)
    args = ["--model", model, "--plan", str(out), "--text", "x", *flags[2:]]
    loaded = load_from_args(parser.parse_args(args + (["--activation", "reglu"] if flags else [])))
    for layer, lp in zip(loaded.model.layers, plan.layers):
        assert isinstance(layer.attn.wqkv, SparseInput) == ("qkv" in lp.inputs.thresholds)
        if {"gate_up", "down"} & set(lp.inputs.thresholds):  # only where the FFN stayed dense
            assert isinstance(layer.ffn, QuantFFN)
            assert isinstance(layer.ffn.gate_up, SparseInput) or isinstance(layer.ffn.down, SparseInput)
    evals = build_corpus(loaded.tokenizer, [corpus_path], 1500, 300).evaluation
    got = perplexity(loaded.model, evals, plan.perplexity["context"])
    assert got == pytest.approx(plan.perplexity["predictor_and_input"], rel=1e-9)
