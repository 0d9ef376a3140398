"""`hotcold plan import SRC --model M --out PLAN`: a plan from predictors that ship with a model (no profiling)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hotcold.engine.errors import HotcoldError
from hotcold.profiler.commands import out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="import predictors: the model folder (embedded mlp.predictor tensors) or "
                                        "a PowerInfer predictor folder (model_{i}.pt)")
    imp.add_argument("src", type=Path, help="the model folder, a PowerInfer predictor folder or a PowerInfer GGUF")
    imp.add_argument("--model", required=True, help="the model the plan is for (HF folder or .gguf)")
    imp.add_argument("--out", required=True, type=out_folder,
                     help="the plan folder to write: new, empty, or a plan folder to replace")
    imp.add_argument("--sparse-threshold", type=float, default=None,
                     help="active iff logit >= this (default: SRC/config.json sparse_threshold, else 0)")
    imp.add_argument("--tokens", type=int, default=1024, help="calibration tokens to measure recall/sparsity")
    imp.add_argument("--corpus", nargs="+", type=Path, default=None, metavar="FILE",
                     help="plain-text or JSONL files (default: the built-in corpus)")
    imp.add_argument("--gpu-memory", default="8GiB", help="GPU memory budget: 8GiB, 512MiB, 0, all")
    imp.add_argument("--gpu-dtype", default="float16", choices=["float16", "bfloat16", "float32", "int8"])
    imp.add_argument("--context", type=int, default=None, help="KV-cache tokens per sequence to reserve")
    imp.add_argument("--batch", type=int, default=1, help="sequences whose KV cache is reserved")


def run(args: argparse.Namespace) -> int:
    from hotcold.engine import placement
    from hotcold.engine.loader import load_model
    from hotcold.engine.plan import save_plan
    from hotcold.profiler.commands import check_placement_args, clear_report
    from hotcold.profiler.corpus import build_corpus
    from hotcold.profiler.import_plan import build_import_plan, read_predictors

    if args.tokens < 16:
        raise HotcoldError("--tokens must be at least 16")
    check_placement_args(args)
    gpu_memory = placement.parse_memory(args.gpu_memory)
    imported = read_predictors(args.src, args.sparse_threshold)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    mcfg = loaded.config
    corpus = build_corpus(loaded.tokenizer, args.corpus, args.tokens, 64, min_calibration=16)
    seq_len = min(256, mcfg.max_position_embeddings)
    sequences = corpus.sequences(seq_len)
    plan = build_import_plan(loaded, imported, sequences, gpu_memory, placement.DTYPE_BYTES[args.gpu_dtype],
                             args.context or min(4096, mcfg.max_position_embeddings), args.batch)
    clear_report(args.out)  # an import writes no report: none of an older run's may stay beside it
    save_plan(plan, args.out)
    st, pl = plan.stats, plan.placement
    print(f"plan written to {args.out} ({len(plan.layers)} layers, {imported.source} predictors, rule logit >= "
          f"{imported.threshold:g} on the pre-norm residual)\n"
          f"measured on {plan.corpus['calibration_tokens']} calibration tokens: predictor recall "
          f"{st['predictor_recall']:.3f}, predictor sparsity {st['predictor_sparsity']:.3f} (true sparsity "
          f"{st['true_sparsity']:.3f})\n"
          f"placement: {pl['hot_neurons']}/{pl['total_neurons']} neurons hot ({pl['frequency_source']}), "
          f"serving {pl['served_share']:.1%} of activations", file=sys.stdout)
    return 0
