"""What the Triton FFN kernels compile to on the H200 (sm_90), read with no GPU: registers, spills, shared
memory, global loads by width and instruction count per launch configuration, from the cubins that
tests/triton_aot.py's launcher builds and the cuobjdump that ships with triton.

The device machine's time is short (METHOD.md: read what costs no device time first): loads 16 bytes wide,
no local memory, tensor-core instructions where tl.dot is meant, are all visible here.

    python benchmarks/triton_sass.py                  # 7B shape, 10% of 11008 neurons, bf16 / Q4_0 / Q8_0
    python benchmarks/triton_sass.py --out results/triton_sass.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from triton_aot import H200_SMS, CompileForH200, random_rows  # noqa: E402

from hotcold.kernels import triton_ffn  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
OPS = {"mma": r"\bHMMA\b|\bHGMMA\b", "ldgsts": r"\bLDGSTS\b", "sts": r"\bSTS\b", "lds": r"\bLDS\b",
       "shfl": r"\bSHFL\b"}
LOAD = re.compile(r"\bLDG(?![A-Z])(?:\.[A-Z0-9_]+)*")  # a global load with all its modifiers (not LDGSTS)


def load_widths(sass: str) -> dict[str, int]:
    """Global loads by width: 128, 64, and 32 bits or fewer (every LDG counted once)."""
    out = {"ldg128": 0, "ldg64": 0, "ldg32": 0}
    for m in LOAD.finditer(sass):
        parts = m.group(0).split(".")
        out["ldg128" if "128" in parts else "ldg64" if "64" in parts else "ldg32"] += 1
    return out


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    out = dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {}
    out.update({k: len(re.findall(p, sass)) for k, p in OPS.items()})
    out.update(load_widths(sass))
    out["instructions"] = len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--neurons", type=int, default=1100, help="active neurons (10%% of a 7B layer's 11008)")
    ap.add_argument("--weights", default="bf16,Q4_0,Q8_0")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "triton_sass.json"))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("this compiles the kernels for a GPU: run it without TRITON_INTERPRET=1")
    compiled: list = []
    triton_ffn._gate_up_kernel = CompileForH200(triton_ffn._gate_up_kernel, compiled)
    triton_ffn._down_kernel = CompileForH200(triton_ffn._down_kernel, compiled)
    triton_ffn._num_sms = lambda device: H200_SMS
    print(f"triton {triton.__version__}, target CUDA sm_90 (H200), {args.neurons} active neurons of "
          f"hidden {args.hidden}, the engine's path (ids with a device-side count)")
    print(f"{'kernel':8s} {'weights':7s} {'B':>3s} {'regs':>5s} {'local':>5s} {'shared':>7s} {'mma':>4s} "
          f"{'LDG128':>6s} {'LDG64':>5s} {'LDG32-':>6s} {'LDGSTS':>6s} {'STS':>4s} {'SHFL':>4s} {'instr':>6s}")
    rows = []
    for weights in args.weights.split(","):
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, args.hidden, dtype=torch.bfloat16)
            w = random_rows(weights, 64, args.hidden)
            idx = torch.zeros(args.neurons, dtype=torch.long)
            count = torch.tensor([args.neurons], dtype=torch.int32)
            h = triton_ffn.gathered_gate_up(x, w, idx, "reglu", w, count=count)
            triton_ffn.gathered_down(h, w, idx, torch.bfloat16, count=count)
            for name, k in zip(("gate_up", "down"), compiled):
                r = dict(kernel=name, weights=weights, batch=B, **resources(k.asm["cubin"]))
                rows.append(r)
                print(f"{name:8s} {weights:7s} {B:3d} {r['regs']:5d} {r['local']:5d} {r['shared']:7d} {r['mma']:4d} "
                      f"{r['ldg128']:6d} {r['ldg64']:5d} {r['ldg32']:6d} {r['ldgsts']:6d} {r['sts']:4d} {r['shfl']:4d} "
                      f"{r['instructions']:6d}")
            compiled.clear()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "hidden": args.hidden,
                               "neurons": args.neurons, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
