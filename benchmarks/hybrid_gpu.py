"""Hybrid hot/cold decode vs a llama.cpp-style layer split vs everything on the GPU, under one GPU budget.

    python benchmarks/hybrid_gpu.py                      # GPU machine: Llama-2-7B shape, synthetic ReGLU weights
    python benchmarks/hybrid_gpu.py --device cpu --tiny  # smoke mode (CI): tiny shape, "GPU" = CPU, seconds
    python benchmarks/hybrid_gpu.py --qtypes q4_0        # the same three setups with Q4_0 FFN rows

1. Writes a synthetic ReLU-family checkpoint (benchmarks/synthetic_model.py: ~90% of FFN neurons inactive per
   token, power-law neuron frequencies) unless it is cached.
2. Profiles it with `hotcold profile` (neuron frequencies, predictors) unless that is cached.
3. For each FFN format (--qtypes: none = the model's dtype; q4_0 etc. quantized at load: Q4_0 gate/up and
   Q8_0 down rows, what the quantized hybrid holds), one GPU budget: the dense parts as the GPU holds them
   (quantized rows in a quantized run), the KV cache, the predictors, and --hot-fraction (30%) of that
   format's FFN bytes. So in every format the budget holds only part of the model. Under it, greedy decode
   at batch 1 with (a) hybrid: attention + the hot neurons this budget holds on the GPU (re-placed from the
   plan's frequencies), cold neurons on CPU workers, predictor mode; (b) layer split: the first k whole
   layers on the GPU, the rest on the CPU, k as large as the same budget allows (output layer on the GPU, as
   llama.cpp's -ngl); (c) all on the GPU. Quantized: hybrid = quantized hot rows on the GPU
   (engine/quant_hybrid.py), split and all-GPU = the same rows through the same kernels for every neuron of
   the GPU layers; attention, embeddings and head go to the GPU as the hybrid's do (quantized rows;
   bfloat16 in the float run).
Prints a table and writes benchmarks/results/hybrid_gpu.json (hybrid_gpu_smoke.json in --tiny mode).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_model import SHAPES, make_synthetic_checkpoint  # noqa: E402

from hotcold import kernels  # noqa: E402
from hotcold.engine import placement  # noqa: E402
from hotcold.engine.activations import kernel_activation  # noqa: E402
from hotcold.engine.cache import KVCache  # noqa: E402
from hotcold.engine.default_model import cache_dir  # noqa: E402
from hotcold.engine.hybrid import HybridConfig, apply_hybrid, move_dense_parts, to_gpu_side  # noqa: E402
from hotcold.engine.layers import QuantFFN  # noqa: E402
from hotcold.engine.loader import load_model  # noqa: E402
from hotcold.engine.model import StepBatch, attn_dtype  # noqa: E402
from hotcold.engine.placement import replan  # noqa: E402
from hotcold.engine.plan import load_plan  # noqa: E402
from hotcold.kernels import qrows, quant  # noqa: E402


def nbytes(*tensors: torch.Tensor | qrows.QRows | None) -> int:
    """Bytes of distinct tensors (a tied head counted once; quantized rows at their own size)."""
    unique = {id(t): t for t in tensors if t is not None}.values()
    return sum(t.nbytes if isinstance(t, qrows.QRows) else t.numel() * t.element_size() for t in unique)


def layer_bytes(block) -> tuple[int, int]:
    """(attention + norms, FFN) bytes of one block (FFN: 16/32-bit rows; QuantGPUFFN: its quantized rows)."""
    a, f = block.attn, block.ffn
    attn = nbytes(a.wqkv, a.bqkv, a.wo, a.bo, block.attn_norm.weight, block.ffn_norm.weight)
    if isinstance(f, QuantGPUFFN):
        return attn, sum(r.nbytes for r in (f.up, f.gate, f.down_t) if r is not None) + nbytes(f.bias, f.down_bias)
    return attn, nbytes(f.gate_up, f.gate_up_bias, f.down_t, f.down_bias)


class QuantGPUFFN(nn.Module):
    """Every neuron of a quantized FFN on the GPU side (a layer the split puts on the GPU): gate/up as the
    checkpoint's blocks taken apart, down as Q8_0 rows, through the gathered kernels over all ids — the
    rows and kernels the quantized hybrid uses for its hot neurons, at 100% density."""

    def __init__(self, ffn: QuantFFN, device: torch.device, backend: str):
        super().__init__()
        n, parts = ffn.intermediate_size, 2 if ffn.gated else 1
        gate_up = quant.untile(ffn.gate_up)
        rows = [qrows.from_quant(gate_up.rows(torch.arange(n) * parts + p)).to(device) for p in range(parts)]
        self.up, self.gate = rows[-1], rows[0] if parts == 2 else None
        down_t = ffn.down_t if ffn.down_t is not None else quant.transpose(ffn.down, "Q8_0")
        self.down_t = qrows.from_quant(down_t).to(device)
        self.bias = None if ffn.gate_up_bias is None else ffn.gate_up_bias.float().view(n, parts).to(device)
        self.down_bias = None if ffn.down_bias is None else ffn.down_bias.to(device)
        self.activation = kernel_activation(ffn.activation, ffn.gelu_approximate, ffn.codes[2])
        self.ids, self.backend = torch.arange(n, device=device), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up_bias, gate_bias = (None, None) if self.bias is None else (self.bias[:, -1], self.bias[:, 0])
        h = kernels.gathered_gate_up(x.float(), self.up, self.ids, self.activation, self.gate, up_bias,
                                     gate_bias=gate_bias if self.gate is not None else None, backend=self.backend)
        y = kernels.gathered_down(h, self.down_t, self.ids, torch.float32, backend=self.backend)
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)


class DeviceBlock(nn.Module):
    """A block that lives on another device: inputs go there, the output comes back (layer split). It runs
    in its own weights' dtype (float32 for quantized ones, whose CPU products take float32)."""

    def __init__(self, block: nn.Module, device: torch.device):
        super().__init__()
        self.block, self.device = block, device
        w = block.attn.wqkv
        self.dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32

    def forward(self, x, rope, batch, cache, layer, token_slots, positions):
        home = x.device
        move = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        rope = None if rope is None else tuple(move(t).float() for t in rope)
        out = self.block(x.to(self.device, self.dtype), rope, batch, cache, layer, move(token_slots),
                         move(positions))
        return out.to(home, x.dtype)


def to_device(block, device: torch.device, backend: str) -> None:
    """A whole block to the GPU: a quantized one's attention as quantized rows, its FFN as QuantGPUFFN."""
    a, f = block.attn, block.ffn
    if isinstance(f, QuantFFN):  # as the hybrid's dense parts go (engine.hybrid.move_dense_parts)
        to = functools.partial(to_gpu_side, device=device,
                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        a.wqkv, a.wo, a.bqkv, a.bo = to(a.wqkv), to(a.wo), to(a.bqkv), to(a.bo)
        for norm in (block.attn_norm, block.ffn_norm):
            norm.weight = to(norm.weight)
        block.ffn = QuantGPUFFN(f, device, backend)
        return
    a.wqkv, a.wo = a.wqkv.to(device), a.wo.to(device)
    a.bqkv, a.bo = (None if t is None else t.to(device) for t in (a.bqkv, a.bo))
    for norm in (block.attn_norm, block.ffn_norm):
        norm.weight = norm.weight.to(device)
    f.gate_up, f.down_t = f.gate_up.to(device), f.down_t.to(device)
    f.gate_up_bias, f.down_bias = (None if t is None else t.to(device) for t in (f.gate_up_bias, f.down_bias))


@torch.inference_mode()
def decode_speed(model, prompt: list[int], new_tokens: int, cpu_layers: set[int] = frozenset()) -> float:
    """Greedy decode at batch 1 with a static cache; tokens/s after the prompt."""
    cfg, device = model.config, model.device
    blocks = list(range(-(-(len(prompt) + new_tokens + 1) // 16)))  # one sequence: blocks 0, 1, 2, ...
    cache = KVCache(cfg.num_layers, len(blocks), cfg.num_kv_heads, 16, cfg.head_dim, attn_dtype(device, model.dtype),
                    device)
    for i in cpu_layers:  # layer split: these layers' KV cache lives with them on the CPU
        cache.k[i], cache.v[i] = cache.k[i].cpu().float(), cache.v[i].cpu().float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    logits = model(torch.tensor(prompt, device=device), StepBatch([blocks], [0], [len(prompt)]), cache,
                   torch.tensor([len(prompt) - 1], device=device))
    token = logits.argmax(-1)
    sync()
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + new_tokens):
        token = model(token.view(1), StepBatch([blocks], [pos], [1]), cache).argmax(-1)
    sync()
    return new_tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shape: a smoke run in seconds")
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape (7B, or --tiny's) with this many layers (the GPU check's time budget: 8)")
    ap.add_argument("--hot-fraction", type=float, default=0.30, help="FFN share the GPU budget holds")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile-tokens", type=int, default=4000)
    ap.add_argument("--predictor-steps", type=int, default=1500, help="training steps per predictor (not --tiny)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--qtypes", default="none", help="FFN rows to run: none (the model's dtype), q4_0, q8_0, "
                    "q4_1, comma-separated (e.g. none,q4_0)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hybrid_gpu[_smoke].json)")
    args = ap.parse_args()
    gpu = torch.device(args.device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny")
    shape_name, shape = ("tiny", SHAPES["tiny"]) if args.tiny else ("llama2-7b", SHAPES["llama2-7b"])
    if args.layers:
        shape_name, shape = f"{shape_name}-{args.layers}l", dataclasses.replace(shape, layers=args.layers)
    dtype = torch.float32 if gpu.type == "cpu" else torch.bfloat16
    folder = make_synthetic_checkpoint(cache_dir() / "synthetic" / shape_name, shape, dtype=dtype)

    context = 512  # the KV cache every setup reserves: one sequence of this many tokens
    plan_dir = folder / "plan"  # frequencies and predictors; each run re-places its hot neurons (gpu_budget)
    if not (plan_dir / "plan.json").exists():
        gpu_dtype = "float32" if dtype == torch.float32 else "bfloat16"
        cmd = [sys.executable, "-m", "hotcold.cli", "profile", "--model", str(folder), "--out", str(plan_dir),
               "--cett", "0", "--tokens", str(args.profile_tokens), "--eval-tokens", str(args.profile_tokens // 4),
               "--gpu-memory", "all", "--gpu-dtype", gpu_dtype, "--context", str(context),
               "--batch", "1", "--no-report", "--quiet"]
        if not args.tiny:  # one rank, twice the gates' (synthetic_model.py), trained longer (on the GPU)
            rank = 2 * json.loads((folder / "config.json").read_text())["synthetic"]["gate_rank"]
            cmd += ["--predictor-rank", str(rank), "--predictor-steps", str(args.predictor_steps)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"profiled in {time.perf_counter() - t0:.0f} s")
    backend = "auto" if gpu.type == "cuda" else "cpu"  # cpu: the GPU side's kernels run on the CPU (smoke mode)
    results = []
    for qtype in args.qtypes.split(","):
        quantize = None if qtype == "none" else qtype.upper()
        base = load_model(folder, dtype=None if quantize else dtype, quantize=quantize)  # loaded (quantized) once
        load = functools.partial(fresh_copy, base)
        plan = load_plan(plan_dir)
        budget, kv = gpu_budget(base.model, plan, dtype.itemsize, args.hot_fraction, context)
        results.append({"qtype": qtype, "rows": [], "hot_share": None, "budget": budget})
        # the JSON is rewritten after each setup: a timeout keeps what ran
        written = functools.partial(report, results, shape_name, gpu, dtype, args)
        run_setups(load, plan, gpu, backend, budget, kv, dtype.itemsize, context, args, quantize, results[-1],
                   written)
        del base, load
    print(f"wrote {report(results, shape_name, gpu, dtype, args, table=True)}")
    return 1 if any("error" in r for res in results for r in res["rows"]) else 0


def gpu_budget(model, plan, dtype_bytes: int, hot_fraction: float, context: int) -> tuple[int, int]:
    """(budget, its KV-cache bytes) for one FFN format: the dense parts as the GPU side holds them (quantized
    rows for a quantized model), one `context`-token sequence's KV cache and the plan's predictors (float32),
    plus hot_fraction of the FFN's bytes as held. Each format gets its own, so that in Q4_0 too the budget
    holds only part of the model and the split has layers left on the CPU."""
    predictors = sum(w.numel() for lp in plan.layers if lp.predictor is not None and lp.predictor.weights
                     for w in lp.predictor.weights.values())
    parts = placement.dense_parts(model, dtype_bytes, predictors, context, 1)
    cfg = model.config
    ffn = placement.model_neuron_bytes(model, dtype_bytes) * cfg.intermediate_size * cfg.num_layers
    return sum(parts.values()) + int(hot_fraction * ffn), parts["kv_cache"]


def fresh_copy(base):
    """A setup's own copy of the loaded model (each setup moves and converts its weights): a memory copy is
    faster than reading and quantizing the checkpoint again, which the GPU check's time budget cannot spare."""
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def report(results: list[dict], shape_name: str, gpu: torch.device, dtype: torch.dtype, args,
           table: bool = False) -> Path:
    """Writes the JSON of what ran so far; with table, prints the table."""
    if table:
        print(f"\n{shape_name} synthetic ReGLU model, device {gpu}, batch 1, {args.new_tokens} tokens, budget "
              f"holds the dense parts + KV cache + predictors + {100 * args.hot_fraction:.0f}% of the FFN's bytes, "
              "each as the GPU holds them in that format")
        print(f"{'FFN rows':9s} {'setup':48s} {'GPU GiB':>8s} {'hot %':>6s} {'tok/s':>8s} {'vs split':>9s}")
        # (the GPU GiB of the hybrid row is its budget; the split's what its whole layers take of the same)
    for res in results if table else ():
        split = next((r["tok_s"] for r in res["rows"] if r["setup"].startswith("layer split") and r["tok_s"]), None)
        for r in res["rows"]:
            hot = f"{100 * res['hot_share']:.0f}" if r is res["rows"][0] and res["hot_share"] else ""
            if r["tok_s"] is None:
                print(f"{res['qtype']:9s} {r['setup']:48s} FAILED: {r['error']}")
                continue
            ratio = f"{r['tok_s'] / split:8.2f}x" if split else ""
            print(f"{res['qtype']:9s} {r['setup']:48s} {r['gpu_bytes'] / 2**30:8.2f} {hot:>6s} {r['tok_s']:8.1f} "
                  f"{ratio}")
    out = Path(args.out or Path("benchmarks/results") / ("hybrid_gpu_smoke.json" if args.tiny else "hybrid_gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "cpu"
    first = results[0]
    out.write_text(json.dumps({"shape": shape_name, "device": device_name, "dtype": str(dtype),
                               "budget_by_qtype": {res["qtype"]: res["budget"] for res in results},
                               "hot_share": first["hot_share"],
                               "rows": [{**r, "qtype": res["qtype"]} for res in results for r in res["rows"]],
                               "hot_share_by_qtype": {res["qtype"]: res["hot_share"] for res in results},
                               "time": time.strftime("%F %T")}, indent=2))
    return out


def run_setups(load, plan, gpu: torch.device, backend: str, budget: int, kv: int, dtype_bytes: int, context: int,
               args, quantize: str | None, result: dict, written) -> None:
    """The three setups under one budget, into result["rows"] (written() after each; a setup that fails is
    recorded with its error and the next one runs); quantized: the hot neurons re-placed for the quantized
    rows' bytes."""
    def measured(setup: str, gpu_bytes, run) -> None:
        row = {"setup": setup, "gpu_bytes": gpu_bytes, "tok_s": None}
        try:
            row.update(run())
        except Exception as e:  # noqa: BLE001 - the one GPU run goes on with the next setup
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            print(f"{setup}: FAILED {row['error']}", flush=True)
        result["rows"].append(row)
        written()

    def hybrid() -> dict:
        loaded = load()
        replan(plan, loaded.model, budget, dtype_bytes, context, 1)  # the hot neurons this budget holds
        result["hot_share"] = sum(lp.hot_count for lp in plan.layers) / sum(lp.num_neurons for lp in plan.layers)
        config = HybridConfig(mode="predictor", placement="hybrid", backend="auto" if not quantize else backend)
        apply_hybrid(loaded.model, plan, config, loaded.fingerprint, gpu_device=gpu, workers=args.workers)
        return {"tok_s": decode_speed(loaded.model, prompt_ids(), args.new_tokens),
                "ffn_sparsity": loaded.model.ffn_counters.sparsity}

    measured("hybrid (hot on GPU, cold on CPU, predictor)", budget, hybrid)

    def layers_on_gpu(setup: str) -> dict:
        """(b) layer split under the same budget, (c) every layer on the GPU."""
        loaded = load()
        model, cfg = loaded.model, loaded.config
        move_dense_parts_only_head(model, gpu)
        fixed = nbytes(model.embed, model.lm_head, model.final_norm.weight)  # as held on the GPU
        k = cfg.num_layers
        for i, block in enumerate(list(model.layers)):
            if i < k:
                to_device(block, gpu, backend)
            if i == 0:  # a layer's bytes as the GPU holds it (quantized FFN rows: QuantGPUFFN's); at least one
                attn_b, ffn_b = layer_bytes(block)
                per_layer = attn_b + ffn_b + kv // cfg.num_layers
                k = cfg.num_layers if setup == "all" else max(1, min(cfg.num_layers, (budget - fixed) // per_layer))
            if i >= k:
                model.layers[i] = DeviceBlock(block, torch.device("cpu"))
        name = f"layer split ({k}/{cfg.num_layers} layers on GPU)" if setup == "split" else "all on GPU (dense)"
        return {"setup": name, "gpu_bytes": fixed + k * per_layer,
                "tok_s": decode_speed(model, prompt_ids(), args.new_tokens, set(range(k, cfg.num_layers)))}

    measured("layer split", None, functools.partial(layers_on_gpu, "split"))
    measured("all on GPU (dense)", None, functools.partial(layers_on_gpu, "all"))


def prompt_ids() -> list[int]:
    return list(range(2, 18))


def move_dense_parts_only_head(model, device: torch.device) -> None:
    """Embeddings, final norm and head on the GPU; the blocks stay where they are (moved one by one)."""
    blocks = list(model.layers)
    model.layers = nn.ModuleList()
    move_dense_parts(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.layers = nn.ModuleList(blocks)


if __name__ == "__main__":
    raise SystemExit(main())
