"""The benchmarks must exist and run: the GPU ones in their `--device cpu --tiny` smoke mode, as CI runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_hybrid_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "hybrid.json"
    env = {**os.environ, "HOTCOLD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "benchmarks/hybrid_gpu.py", "--device", "cpu", "--tiny", "--profile-tokens", "1200",
         "--new-tokens", "8", "--workers", "1", "--qtypes", "none,q4_0", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["qtype"], r["setup"].split()[0]) for r in data["rows"]] == [
        (q, s) for q in ("none", "q4_0") for s in ("hybrid", "layer", "all")]
    assert all(r["tok_s"] > 0 for r in data["rows"])
    # each format's budget holds part of its own model: about 30% of the neurons hot (the default), and the
    # split leaves layers on the CPU; a quantized model's budget is smaller (its rows cost fewer bytes)
    assert all(0.25 < share < 0.4 for share in data["hot_share_by_qtype"].values()), data["hot_share_by_qtype"]
    for r in data["rows"]:
        if r["setup"].startswith("layer split"):
            on_gpu, layers = map(int, r["setup"].split("(")[1].split()[0].split("/"))
            assert 0 < on_gpu < layers, r["setup"]
    assert data["budget_by_qtype"]["q4_0"] < data["budget_by_qtype"]["none"]


def test_decode_cpu_synthetic_smoke(tmp_path):
    """decode_cpu.py --synthetic: builds, profiles and decodes a tiny sparse model; the ceiling row is there."""
    out = tmp_path / "decode.json"
    env = {**os.environ, "HOTCOLD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "benchmarks/decode_cpu.py", "--synthetic", "tiny", "--dtypes", "float32", "--plan-dtype",
         "float32", "--no-transformers", "--eval-tokens", "200", "--new-tokens", "8", "--runs", "1",
         "--profile-tokens", "1200", "--predictor-steps", "150", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["engine"]: r for r in json.loads(out.read_text())["rows"]}
    predictor = rows["hotcold predictor float32 (plan)"]
    assert 0 < predictor["ffn_sparsity"] < 1 and predictor["perplexity"] > 1
    bound = rows["hotcold no FFN (ceiling) float32 (plan)"]["bound"]
    # the share is a timing (8 tokens of a tiny model: noise can make it negative), so only its use is checked
    share, oracle = bound["ffn_share_of_decode"], bound["oracle_sparsity"]
    assert math.isfinite(share) and share < 1 and oracle > 0.8  # --cett 0 on a 90%-sparse model
    assert bound["max_speedup_at_oracle_sparsity"] == pytest.approx(1 / (1 - share * oracle))


def test_triton_sass_report(tmp_path):
    """benchmarks/triton_sass.py: the kernels compiled for sm_90 here, their resources read from the cubins."""
    out = tmp_path / "sass.json"
    result = subprocess.run([sys.executable, "benchmarks/triton_sass.py", "--weights", "Q4_0", "--batches", "1",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["gate_up", "down"]
    # read from the cubin: registers, and the 4-bit codes as vector loads (a byte per weight would be 64)
    assert all(0 < r["regs"] <= 255 and r["local"] == 0 for r in rows) and rows[0]["ldg32"] < 16


@pytest.mark.parametrize("qtype", [None, "q4_0"])  # the GPU check runs both (benchmarks/gpu_check.sh)
def test_ffn_gpu_benchmark_smoke_mode(tmp_path, qtype):
    out = tmp_path / "ffn_gpu_smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "benchmarks/ffn_gpu.py", "--device", "cpu", "--tiny", "--out", str(out),
                          *(["--qtype", qtype] if qtype else [])], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 6 and result["max_rel_err_vs_dense"] < 3e-2


def test_ffn_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "ffn_cpu.json"
    args = ["--shapes", "default", "--dtypes", "float32", "--densities", "1,0.1", "--calls", "6", "--quick",
            "--crossover-shapes", "default", "--crossover-batches", "2", "--bandwidth-mib", "64", "--out", str(out)]
    run = subprocess.run([sys.executable, "benchmarks/ffn_cpu.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["path"] for r in result["sweep"]} == {"dense", "sparse", "sparse_separate"}
    assert result["crossover"][0]["batch"] == 2 and result["machine"]["read_gbs"] > 0
