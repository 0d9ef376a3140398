"""Predictor mode on the default model with a plan from `hotcold profile`: the hybrid executor's held-out
perplexity equals what the profiler reported (it measured it with its own unfused masked reference)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hotcold.engine.hybrid import HybridConfig, apply_hybrid
from hotcold.engine.loader import load_model
from hotcold.engine.perplexity import perplexity
from hotcold.engine.plan import load_plan
from hotcold.profiler.corpus import build_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory, default_model_path):
    out = tmp_path_factory.mktemp("plans") / "default"
    cmd = [sys.executable, "-m", "hotcold.cli", "profile", "--model", str(default_model_path), "--out", str(out),
           "--tokens", "3000", "--eval-tokens", "512", "--cett", "0.05", "--no-report", "--quiet",
           # one small predictor rank, few steps: what is checked is that the executor reproduces the report
           "--predictor-rank", "16", "--predictor-steps", "60"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("mode", ["oracle", "predictor"])
def test_hybrid_perplexity_matches_the_profilers_report(small_plan, default_model_path, mode):
    loaded = load_model(default_model_path, dtype="float32")
    plan = load_plan(small_plan, loaded.fingerprint)
    held_out = build_corpus(loaded.tokenizer, None, 3000, 512).evaluation
    assert len(held_out) == plan.perplexity["tokens"]
    dense = perplexity(loaded.model, held_out, plan.perplexity["context"])
    apply_hybrid(loaded.model, plan, HybridConfig(mode=mode, placement="hybrid"), loaded.fingerprint, workers=1)
    sparse = perplexity(loaded.model, held_out, plan.perplexity["context"])
    assert dense == pytest.approx(plan.perplexity["dense"], rel=1e-4)
    assert sparse == pytest.approx(plan.perplexity[mode], rel=2e-3)
    assert sparse > dense  # neurons really were dropped
    assert loaded.model.ffn_counters.sparsity == pytest.approx(plan.perplexity[f"{mode}_sparsity"], abs=0.02)
