"""Input sparsity (TEAL) on the CPU: decode and prefill speed, held-out perplexity, beside llama.cpp.

    python benchmarks/input_sparsity.py --plan PLAN                   # the default model with an input plan
    python benchmarks/input_sparsity.py --synthetic --sparsities 0.4 0.5   # 8 layers of Llama-2-7B's shape

Rows, interleaved run by run (A/B/C, A/B/C, ...): hotcold dense, hotcold with input sparsity (the plan's
thresholds, or every site at one share of dropped inputs: its inputs' quantile on calibration text), and
llama.cpp's llama-bench on the same GGUF and threads. Input sparsity runs on decode tokens (the default):
prefill keeps every input but reads the input-major layout. Perplexity: the held-out built-in text, every
token sparsified (what decode sees). The synthetic model is SwiGLU with random Q4_0 weights
(synthetic_gguf.py): its projection inputs are zero-mean and unimodal, as TEAL observed in trained models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import LONG_TEXT, PROMPT, cpu_line, time_hotcold, time_llama_cpp  # noqa: E402

from hotcold.engine import input_sparsity  # noqa: E402
from hotcold.engine.loader import load_model, resolve_model_path  # noqa: E402
from hotcold.engine.perplexity import perplexity  # noqa: E402
from hotcold.kernels import native  # noqa: E402
from hotcold.profiler.input_plan import site_params  # noqa: E402


def held_out(tokenizer, n: int) -> list[int]:
    from hotcold.profiler.corpus import builtin_texts

    ids: list[int] = []
    for doc in builtin_texts()[1]:
        ids += tokenizer.encode(doc + "\n\n")
        if len(ids) >= n:
            break
    return ids[:n]


def quantile_thresholds(model, ids: list[int], share: float) -> list[dict[str, float]]:
    """Every site at `share` of its inputs dropped: the quantile of its input magnitudes over `ids`."""
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    saved = input_sparsity.apply_input_sparsity(
        model, [{} for _ in model.layers], input_major=False,
        observe=lambda i, s, x: seen.setdefault((i, s), []).append(x.detach().abs().flatten()[::7]))
    with torch.inference_mode():
        model.forward_sequence(torch.tensor(ids))
    input_sparsity.restore(model, saved)
    return [{s: float(torch.cat(seen[(i, s)]).quantile(share)) for s in input_sparsity.SITES}
            for i in range(len(model.layers))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--synthetic", action="store_true", help="the 8-layer Llama-2-7B-shaped SwiGLU Q4_0 GGUF")
    ap.add_argument("--plan", action="append", default=[], dest="plans",
                    help="an input-sparsity plan (hotcold profile --sparsity input); repeatable")
    ap.add_argument("--sparsities", type=float, nargs="*", default=[], help="every site at this share dropped")
    ap.add_argument("--sparse-prefill", action="store_true", help="also rows that sparsify prompt tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out perplexity tokens (0: skip)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/input_sparsity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native.set_threads(args.threads)
    if args.synthetic:
        from synthetic_gguf import make_synthetic_gguf

        from hotcold.engine.default_model import cache_dir

        path = make_synthetic_gguf(cache_dir() / "synthetic" / "llama7b-8l-q4_0.gguf")
    else:
        path = resolve_model_path(args.model)

    variants: list[tuple[str, object, bool]] = [("dense", None, False)]
    for prefill in (False, True) if args.sparse_prefill else (False,):
        tail = " +prefill" if prefill else ""
        variants += [(f"input plan {Path(p).name}{tail}", p, prefill) for p in args.plans]
        variants += [(f"input {s:.0%} per site{tail}", s, prefill) for s in args.sparsities]
    engines = []
    for name, how, prefill in variants:
        loaded = load_model(path)
        model = loaded.model
        calib = loaded.tokenizer.encode(LONG_TEXT)[:256]
        if isinstance(how, str):
            from hotcold.engine.plan import load_plan

            plan = load_plan(how, loaded.fingerprint)
            thresholds = [lp.inputs.thresholds for lp in plan.layers]
        elif how is not None:
            thresholds = quantile_thresholds(model, calib, how)
        row = {"engine": f"hotcold {name}"}
        if how is not None:
            input_sparsity.apply_input_sparsity(model, thresholds, prefill=prefill)
            with torch.inference_mode():  # what each site drops, every token sparse (the per-op path)
                model.forward_sequence(torch.tensor(loaded.tokenizer.encode(PROMPT * 4)[:128]))
            row["site_sparsity"] = input_sparsity.site_sparsity(model)
            params = [site_params(block) for block in model.layers]
            row["weights_skipped"] = sum(p[s] * sp.get(s, 0.0) for p, sp in zip(params, row["site_sparsity"])
                                         for s in p) / sum(sum(p.values()) for p in params)
            for w in [m for layer in model.layers for m in (layer.attn.wqkv, layer.attn.wo,
                                                            getattr(layer.ffn, "gate_up", None),
                                                            getattr(layer.ffn, "down", None))]:
                if isinstance(w, input_sparsity.SparseInput):
                    w.kept = w.seen = 0.0
        if args.eval_tokens and not prefill:  # (the same as without: perplexity sparsifies every token)
            row["perplexity"] = perplexity(model, held_out(loaded.tokenizer, args.eval_tokens), 512)
        engines.append((row, loaded))
    prompt_ids = engines[0][1].tokenizer.encode(PROMPT)
    long_ids = engines[0][1].tokenizer.encode(LONG_TEXT * 8)[: args.prefill]
    runs: dict[str, list[dict]] = {row["engine"]: [] for row, _ in engines}
    if not args.no_llama:
        runs["llama.cpp"] = []
    for _ in range(args.runs):  # interleaved: each round times every engine once
        for row, loaded in engines:
            runs[row["engine"]].append(time_hotcold(loaded, prompt_ids, long_ids, args.new_tokens, 1))
        if not args.no_llama:
            runs["llama.cpp"].append(time_llama_cpp(path, args.threads, args.new_tokens, args.prefill))
    rows = []
    for name, results in runs.items():
        row = next((r for r, _ in engines if r["engine"] == name), {"engine": name})
        row["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in results)
        row["prefill_tok_s"] = statistics.median(r["prefill_tok_s"] for r in results)
        row["decode_runs"] = [r["decode_tok_s"] for r in results]
        rows.append(row)
    dense = rows[0]
    print(cpu_line())
    print(f"model {path.name}, {args.threads} threads, decode {args.new_tokens} tokens, prefill {args.prefill}, "
          f"{args.runs} interleaved runs (medians)")
    print(f"{'engine':40} {'decode tok/s':>12} {'x dense':>8} {'prefill tok/s':>14} {'ppl':>9} {'skipped':>8}")
    for row in rows:
        dropped = f"{row['weights_skipped']:.1%}" if "weights_skipped" in row else ""
        ppl = f"{row['perplexity']:.3f}" if row.get("perplexity") else ""
        print(f"{row['engine']:40} {row['decode_tok_s']:12.1f} {row['decode_tok_s'] / dense['decode_tok_s']:8.2f} "
              f"{row['prefill_tok_s']:14.1f} {ppl:>9} {dropped:>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu_line(), "model": str(path), "threads": args.threads,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
