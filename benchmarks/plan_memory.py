"""Resident memory of a model as `hotcold serve` holds it, without and with a plan: after load (and the plan's
conversion) and at peak, against the bytes of the weights file. Each case runs in a fresh process.

    python benchmarks/plan_memory.py --model PATH --plan PLAN [--activation reglu] [--sparsity predictor]

Prints a table and writes benchmarks/results/plan_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, torch
from hotcold.engine.loader import load_model
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
args = json.loads(sys.argv[1])
before = rss()
loaded = load_model(args["model"], activation=args["activation"])
if args["plan"]:
    from hotcold.engine.hybrid import HybridConfig, apply_hybrid
    from hotcold.engine.plan import load_plan
    plan = load_plan(args["plan"], loaded.fingerprint)
    apply_hybrid(loaded.model, plan, HybridConfig(mode=args["sparsity"], placement="cpu"), loaded.fingerprint)
    del plan  # as the server keeps it: not at all
import gc; gc.collect()
sparse = sum(type(layer.ffn).__name__ == "QuantSparseFFN" for layer in loaded.model.layers)
print(json.dumps({"rss": rss(), "before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "sparse_layers": sparse, "layers": len(loaded.model.layers)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--activation", default=None)
    ap.add_argument("--sparsity", default="predictor", choices=["oracle", "predictor"])
    ap.add_argument("--out", default="benchmarks/results/plan_memory.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_cpu import cpu_line

    from hotcold.engine.loader import resolve_model_path

    path = resolve_model_path(args.model)
    rows = []
    for plan in (None, args.plan):
        spec = {"model": str(path), "activation": args.activation, "plan": plan, "sparsity": args.sparsity}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        rows.append({"case": "with plan" if plan else "dense", **json.loads(out.stdout.strip().splitlines()[-1])})
    size = path.stat().st_size
    print(f"\n{cpu_line()}")
    print(f"model {path.name} ({size / 1e6:.0f} MB file), plan {args.plan}, sparsity {args.sparsity}")
    print(f"{'case':10s} {'RSS MB':>8s} {'vs dense':>8s} {'peak MB':>8s} {'peak/file':>9s} {'above start/file':>16s} "
          f"{'sparse layers':>13s}")
    for r in rows:  # "above start": the peak less what the process held before loading (Python, torch)
        print(f"{r['case']:10s} {r['rss'] / 1e6:8.0f} {r['rss'] / rows[0]['rss']:7.2f}x {r['peak'] / 1e6:8.0f} "
              f"{r['peak'] / size:8.2f}x {(r['peak'] - r['before']) / size:15.2f}x {r['sparse_layers']:>6d} of "
              f"{r['layers']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": cpu_line(), "model": str(path), "file_bytes": size,
                                          "plan": args.plan, "rows": rows,
                                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
