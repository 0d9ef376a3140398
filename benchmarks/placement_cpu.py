"""`--placement hybrid` against `--placement cpu` when both sides are on the CPU (issue 14's target: hybrid
is not slower), on a float synthetic ReGLU model and its plan.

    python benchmarks/placement_cpu.py                  # cpu-small shape, float32, 30% of neurons "hot"
    python benchmarks/placement_cpu.py --shape tiny --runs 1 --new-tokens 8   # smoke

Three engines, interleaved run by run, decode at batch 1:
- `cpu`: every neuron on the CPU side;
- `hybrid`: what `--placement hybrid` runs on a machine without a GPU (every neuron on the CPU side too:
  engine.hybrid.apply_hybrid folds the split away there);
- `hybrid, split`: the split kept (kernel backend named, as tests do): hot neurons through the CPU kernels
  on the engine's thread while a worker runs the cold ones, both with all cores' threads — what `hybrid`
  ran before, and why it no longer does.
The plan's placement is redone for a budget that holds --hot-fraction of the FFN (placement.replan, as
--gpu-memory does). Prints a table with the CPU line and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import PROMPT, cpu_line, synthetic_model_and_plan, time_hotcold  # noqa: E402

from hotcold.engine.hybrid import HybridConfig, apply_hybrid  # noqa: E402
from hotcold.engine.loader import load_model  # noqa: E402
from hotcold.engine.placement import dense_parts, model_neuron_bytes, replan  # noqa: E402
from hotcold.engine.plan import load_plan  # noqa: E402
from hotcold.kernels import native  # noqa: E402

SETUPS = {"cpu": ("cpu", "auto"), "hybrid": ("hybrid", "auto"), "hybrid, split": ("hybrid", "cpu")}


def engine_for(folder: Path, plan_dir: Path, setup: str, args: argparse.Namespace):
    placement, backend = SETUPS[setup]
    loaded = load_model(folder, dtype=args.dtype)
    plan = load_plan(plan_dir, loaded.fingerprint)
    if placement == "hybrid":
        model, itemsize = loaded.model, loaded.model.dtype.itemsize
        ffn = model_neuron_bytes(model, itemsize) * sum(lp.num_neurons for lp in plan.layers)
        predictors = sum(w.numel() for lp in plan.layers if lp.predictor is not None
                         for w in (lp.predictor.weights or {}).values())
        budget = sum(dense_parts(model, itemsize, predictors, 512, 1).values()) + int(args.hot_fraction * ffn)
        replan(plan, model, budget, itemsize, 512, 1)
    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", placement=placement, backend=backend),
                 loaded.fingerprint, gpu_device="cpu", workers=args.workers)
    ffn = loaded.model.layers[0].ffn
    return loaded, ffn.hot.num / ffn.intermediate_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hot-fraction", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile-tokens", type=int, default=4000)
    ap.add_argument("--out", default="benchmarks/results/placement_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native.set_threads(args.threads)
    folder, plan_dir = synthetic_model_and_plan(args.shape, args.profile_tokens)
    engines = {p: engine_for(folder, plan_dir, p, args) for p in SETUPS}
    prompt = engines["cpu"][0].tokenizer.encode(PROMPT)
    runs: dict[str, list[float]] = {p: [] for p in engines}
    sparsity: dict[str, float | None] = {}
    for _ in range(args.runs):  # A/B/A/B
        for p, (loaded, _) in engines.items():
            loaded.model.ffn_counters.reset()
            runs[p].append(time_hotcold(loaded, prompt, prompt[:8], args.new_tokens, 1)["decode_tok_s"])
            sparsity[p] = loaded.model.ffn_counters.sparsity
    rows = [{"setup": p, "hot_share_of_neurons": engines[p][1], "decode_tok_s": statistics.median(runs[p]),
             "runs": runs[p], "ffn_sparsity": sparsity[p]} for p in engines]
    print(f"\n{cpu_line()}")
    print(f"{args.shape} synthetic ReGLU, {args.dtype}, {args.threads} threads, {args.workers} worker(s), batch 1, "
          f"{args.new_tokens} tokens, median of {args.runs} interleaved runs")
    print(f"{'setup':14s} {'hot neurons':>12s} {'sparsity':>9s} {'decode tok/s':>13s} {'vs cpu':>7s}")
    for r in rows:
        print(f"{r['setup']:14s} {100 * r['hot_share_of_neurons']:11.0f}% {r['ffn_sparsity'] or 0:9.3f} "
              f"{r['decode_tok_s']:13.1f} {r['decode_tok_s'] / rows[0]['decode_tok_s']:6.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_line(), "shape": args.shape, "dtype": args.dtype, "threads": args.threads,
                               "workers": args.workers, "rows": rows, "time": time.strftime("%F %T")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
