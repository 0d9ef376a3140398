"""Profiling the default model with the built-in corpus: wall time, sparsity, perplexity, predictors.

    python benchmarks/profile_default.py [--model default] [--tokens 50000] [--out /tmp/plan_default]
        [--threads N]

One default `hotcold profile` run (1% perplexity budget; timed end to end, model load excluded), then, on
its CETT curves: the per-layer sparsity and held-out perplexity at CETT 0.05 / 0.1 / 0.2 (oracle, grid
thresholds), and the search under a 2% budget with both allocations (uniform vs per-layer).
Prints a table and writes benchmarks/results/profile_default.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hotcold.engine.loader import load_model
from hotcold.engine.placement import place_neurons
from hotcold.engine.plan import save_plan
from hotcold.profiler import collect, search
from hotcold.profiler.corpus import build_corpus
from hotcold.profiler.pipeline import ProfileConfig, profile
from hotcold.profiler.report import write_report

RESULTS = Path(__file__).parent / "results" / "profile_default.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("/tmp/hotcold_plan_default"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32")
    corpus = build_corpus(loaded.tokenizer, None, args.tokens, args.eval_tokens)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = profile(loaded, corpus, ProfileConfig(), quiet=True)
    wall = time.perf_counter() - t0
    save_plan(result.plan, args.out)
    write_report(result, args.out)
    plan = result.plan
    ppl = plan.perplexity
    L = len(plan.layers)
    model = loaded.model

    def evaluate(alloc):
        return collect.perplexity_with(model, collect.oracle_ffns(alloc.thresholds), corpus.evaluation, 1024)

    at_cett = {}
    for c in (0.05, 0.1, 0.2):
        alloc = search.allocate(result.curves, c, "uniform")
        p, s = evaluate(alloc)
        at_cett[str(c)] = {"per_layer_sparsity": alloc.sample_sparsity, "mean_sparsity": alloc.mean_sparsity,
                           "heldout_sparsity": s, "perplexity": p, "increase": p / ppl["dense"] - 1}
    t1 = time.perf_counter()
    two = search.search(result.curves, evaluate, ppl["dense"], 0.02, weights=result.weights)
    two_time = time.perf_counter() - t1

    sweep = []  # the placement at smaller GPU budgets, from the same frequencies
    freqs = [lp.frequency.double() for lp in plan.layers]
    nbytes, reserved = plan.placement["neuron_bytes"], plan.placement["reserved_bytes"]
    for mib in (200, 225, 250, 275, 300):
        pl = place_neurons(freqs, [nbytes] * L, max(0, mib * 2**20 - reserved))
        sweep.append({"gpu_mib": mib, "hot_neurons": sum(pl.hot_counts), "hot_bytes": pl.hot_bytes,
                      "served_share": pl.served / pl.total, "hot_share": sum(pl.hot_counts) / (L * len(freqs[0]))})

    def best(res, k):
        v = res.best.get(k)
        return None if v is None else vars(v)

    preds = [lp.predictor for lp in plan.layers]
    one = result.search
    out = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg()[0]},
        "model": plan.model, "corpus": plan.corpus,
        "profile_wall_s": wall, "stage_s": result.timings,
        "default_run": {
            "targets": plan.targets, "perplexity": ppl,
            "per_layer_sparsity": [lp.sparsity for lp in plan.layers],
            "per_layer_cett": [lp.cett for lp in plan.layers],
            "uniform_best": best(one, "uniform"), "per_layer_best": best(one, "per-layer"),
            "search_points": [vars(p) for p in one.points],
            "predictor": {
                "recall_target": plan.targets["recall_target"],
                "ranks": [p.rank for p in preds],
                "recall": [p.recall for p in preds], "sparsity": [p.sparsity for p in preds],
                "topk_recall": [p.topk_recall for p in preds], "topk_sparsity": [p.topk_sparsity for p in preds],
                "mean_recall": sum(p.recall for p in preds) / L,
                "mean_sparsity": sum(p.sparsity for p in preds) / L,
                "mean_topk_recall": sum(p.topk_recall for p in preds) / L,
                "mean_topk_sparsity": sum(p.topk_sparsity for p in preds) / L,
                "ppl_increase_ratio_vs_oracle": (ppl["predictor"] - ppl["dense"]) / max(
                    ppl["oracle"] - ppl["dense"], 1e-12),
            },
            "placement": plan.placement,
        },
        "placement_sweep": sweep,
        "at_cett": at_cett,
        "max_ppl_increase_2pct": {"uniform_best": best(two, "uniform"), "per_layer_best": best(two, "per-layer"),
                                  "chosen": None if two.chosen is None else vars(two.chosen),
                                  "points": [vars(p) for p in two.points], "search_s": two_time},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, default=str) + "\n")

    print(f"profile wall time {wall:.0f} s (load avg {load_before:.1f} -> {os.getloadavg()[0]:.1f}); stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()))
    print(f"{'setting':<28} {'mean sparsity':>13} {'perplexity':>10} {'vs dense':>9}")
    print(f"{'dense':<28} {0:>13.3f} {ppl['dense']:>10.3f} {'':>9}")
    for c, r in at_cett.items():
        print(f"{'oracle CETT ' + c:<28} {r['heldout_sparsity']:>13.3f} {r['perplexity']:>10.3f} "
              f"{r['increase']:>+9.2%}")
    for name, res in (("1%", one), ("2%", two)):
        for k in ("uniform", "per-layer"):
            v = res.best.get(k)
            if v is not None:
                print(f"{'budget ' + name + ' ' + k:<28} {v.sparsity:>13.3f} {v.perplexity:>10.3f} "
                      f"{v.increase:>+9.2%}")
    print(f"{'predictors (default plan)':<28} {ppl['predictor_sparsity']:>13.3f} {ppl['predictor']:>10.3f} "
          f"{ppl['predictor'] / ppl['dense'] - 1:>+9.2%}")
    pr = out["default_run"]["predictor"]
    print(f"predictor recall {pr['mean_recall']:.3f} sparsity {pr['mean_sparsity']:.3f} (top-k: recall "
          f"{pr['mean_topk_recall']:.3f} sparsity {pr['mean_topk_sparsity']:.3f}); ppl increase "
          f"{pr['ppl_increase_ratio_vs_oracle']:.2f}x the oracle's")
    for c, r in at_cett.items():
        print(f"CETT {c} per-layer sparsity: " + " ".join(f"{s:.2f}" for s in r["per_layer_sparsity"]))
    for r in sweep:
        print(f"GPU {r['gpu_mib']} MiB: {r['hot_share']:.1%} of neurons hot, serving {r['served_share']:.1%} "
              "of activations")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
