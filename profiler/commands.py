"""`hotcold profile`: run a corpus through the model and write a hot/cold plan folder with its report."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hotcold.engine.errors import HotcoldError


def _fraction(text: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a percentage, got {text!r}") from None
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


def out_folder(text: str) -> Path | None:
    """--out's type: None for an empty string (Path("") would be the current folder), which
    check_placement_args refuses in one line."""
    return Path(text) if text.strip() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default' (SmolLM2-135M)")
    parser.add_argument("--activation", default=None,
                        choices=["swiglu", "reglu", "drelu", "geglu", "fatrelu", "relu", "relu2", "gelu"],
                        help="override the FFN activation the config declares")
    parser.add_argument("--out", required=True, type=out_folder,
                        help="the plan folder to write: new, empty, or a plan folder to replace")
    parser.add_argument("--corpus", nargs="+", type=Path, default=None, metavar="FILE",
                        help="plain-text or JSONL (`text` field) files (default: a built-in corpus)")
    parser.add_argument("--tokens", type=int, default=50_000, help="calibration tokens (default 50000)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--cett", type=float, default=None, help="a fixed CETT target per layer, e.g. 0.1")
    target.add_argument("--max-ppl-increase", type=_fraction, default=None, metavar="PCT",
                        help="largest held-out perplexity increase, e.g. 2%% (default 1%% when no --cett)")
    parser.add_argument("--allocation", default="auto", choices=["auto", "uniform", "per-layer"],
                        help="one CETT target for all layers, or per-layer targets (auto: uniform with "
                             "--cett, the better of both under a perplexity budget)")
    parser.add_argument("--recall-target", type=float, default=None,
                        help="predictor recall target (default 0.99 ReLU-family, 0.95 otherwise)")
    parser.add_argument("--predictor-rank", type=int, default=None, help="the same rank for every layer")
    parser.add_argument("--predictor-steps", type=int, default=300, help="training steps per predictor")
    parser.add_argument("--gpu-memory", default="8GiB", help="GPU memory budget: 8GiB, 512MiB, 0, all")
    parser.add_argument("--gpu-dtype", default="float16", choices=["float16", "bfloat16", "float32", "int8"],
                        help="weights' dtype on the GPU (sets bytes per neuron)")
    parser.add_argument("--context", type=int, default=None,
                        help="KV-cache tokens per sequence to reserve (default min(4096, model maximum))")
    parser.add_argument("--batch", type=int, default=1, help="sequences whose KV cache is reserved")
    parser.add_argument("--min-hot-per-layer", type=int, default=0,
                        help="neurons each layer keeps on the GPU at least (PowerInfer's constraint)")
    parser.add_argument("--sparsity", default="auto", choices=["auto", "neuron", "input"],
                        help="neuron: FFN neurons with predictors (best for ReLU-family models); input: "
                             "thresholds on every projection's inputs (TEAL, no training); auto: for ReLU-family "
                             "activations neuron FFNs plus input thresholds for attention and for the FFNs the "
                             "neuron plan leaves dense (with --cett: neuron only), input for the others")
    parser.add_argument("--quantize", default=None, choices=["q8_0", "q4_0", "q4_1"],
                        help="input sparsity: profile the checkpoint quantized at load, as it will be served")
    parser.add_argument("--min-site-sparsity", type=_fraction, default=None, metavar="PCT",
                        help="input sparsity: a projection allocated fewer dropped inputs stays dense (default: "
                             "where the input-sparse kernel beats the dense one, measured on the model's matrices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and its plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def check_placement_args(args: argparse.Namespace) -> None:
    """The flags every plan-writing command shares: where it goes and the KV cache its budget reserves."""
    check_out_folder(args.out)
    if args.context is not None and args.context < 1:
        raise HotcoldError("--context must be at least 1 token")
    if args.batch < 1:
        raise HotcoldError("--batch must be at least 1")


def check_out_folder(out: Path | None) -> None:
    """Before any work: --out must be a folder a plan can be written to, and never one holding something else
    (a non-empty folder is replaced only when it holds a hotcold plan). Writing is tried (the folders it needs
    and a temporary file, removed again), so a path under a file or a read-only place fails now, not after
    minutes of profiling."""
    from hotcold.engine.plan import is_plan_folder

    if out is None:
        raise HotcoldError("--out is empty: give the plan folder to write")
    if out.is_dir():
        if any(out.iterdir()) and not is_plan_folder(out):
            raise HotcoldError(f"--out {out} is a folder that holds other files and no hotcold plan; give a new or "
                               "empty folder (a plan folder is replaced)")
    elif out.exists() or out.is_symlink():
        raise HotcoldError(f"--out {out} exists and is not a folder")
    missing = [p for p in (out, *out.parents) if not (p.exists() or p.is_symlink())]
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise HotcoldError(f"--out {out} cannot be created or written to: {exc.strerror or exc}") from None
    finally:
        for p in missing:  # deepest first; rmdir removes only the empty folders made here
            try:
                p.rmdir()
            except OSError:
                break


def clear_report(out: Path) -> None:
    """Remove an older run's report.md and plots from a plan folder being replaced, so that the folder never
    mixes two runs (a report written next lands in a clean folder; --no-report and imports leave none)."""
    for p in [out / "report.md", *out.glob("*.png")]:
        p.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from hotcold.engine import placement
    from hotcold.engine.commands_generate import check_threads_arg
    from hotcold.engine.loader import load_model, model_config
    from hotcold.profiler import predictor
    from hotcold.profiler.corpus import build_corpus
    from hotcold.profiler.pipeline import RELU_FAMILY, ProfileConfig, profile

    if args.tokens < 256:
        raise HotcoldError("--tokens must be at least 256")
    if args.eval_tokens < 64:
        raise HotcoldError("--eval-tokens must be at least 64")
    if args.cett is not None and not 0 <= args.cett < 1:
        raise HotcoldError("--cett must be in [0, 1)")
    if args.recall_target is not None and not 0 < args.recall_target <= 1:
        raise HotcoldError("--recall-target must be in (0, 1]")
    if args.predictor_rank is not None and args.predictor_rank < 1:
        raise HotcoldError("--predictor-rank must be at least 1")
    if args.predictor_steps < 1:
        raise HotcoldError("--predictor-steps must be at least 1")
    check_threads_arg(args.threads)
    if args.min_site_sparsity is not None and args.min_site_sparsity > 1:
        raise HotcoldError("--min-site-sparsity must be in [0, 100%]")
    check_placement_args(args)
    gpu_memory = placement.parse_memory(args.gpu_memory)
    mcfg = model_config(args.model, args.activation)
    _check_model_flags(args, mcfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparsity == "input" or (args.sparsity == "auto" and args.cett is None and
                                    mcfg.activation not in RELU_FAMILY):
        return _run_input(args, load_model(args.model, device="cpu", activation=args.activation,
                                           quantize=args.quantize))  # the model as it is served
    loaded = load_model(args.model, dtype="float32", device="cpu", activation=args.activation)
    mcfg = loaded.config
    cfg = ProfileConfig(
        cett=args.cett, max_ppl_increase=args.max_ppl_increase, allocation=args.allocation,
        recall_target=args.recall_target, predictor_rank=args.predictor_rank,
        train=predictor.TrainConfig(steps=args.predictor_steps, seed=args.seed),
        gpu_memory=gpu_memory, gpu_dtype_bytes=placement.DTYPE_BYTES[args.gpu_dtype],
        context=args.context or min(4096, mcfg.max_position_embeddings), batch=args.batch,
        min_hot_per_layer=args.min_hot_per_layer, seed=args.seed,
        seq_len=min(256, mcfg.max_position_embeddings), eval_context=min(1024, mcfg.max_position_embeddings),
    )
    corpus = build_corpus(loaded.tokenizer, args.corpus, args.tokens, args.eval_tokens)
    result = profile(loaded, corpus, cfg, quiet=args.quiet)
    from hotcold.engine.plan import save_plan

    if args.sparsity == "auto" and args.cett is None:  # neuron FFNs, and input sparsity where they leave room
        del loaded
        _add_input_sites(args, result.plan, corpus)
    clear_report(args.out)
    save_plan(result.plan, args.out)
    if not args.no_report:
        from hotcold.profiler.report import write_report

        write_report(result, args.out)
    _print_summary(result, args.out)
    return 0


def _check_model_flags(args: argparse.Namespace, mcfg) -> None:
    """The flags bounded by the model's shapes, from its config alone (before its weights load)."""
    if mcfg.num_experts:
        raise HotcoldError("mixture-of-experts models are not profiled: plans cover dense FFNs only")
    H, I = mcfg.hidden_size, mcfg.intermediate_size
    if args.predictor_rank is not None and args.predictor_rank > min(H, I):  # low rank: at most min(H, I)
        raise HotcoldError(f"--predictor-rank {args.predictor_rank} is above the model's hidden size {H} / "
                           f"intermediate size {I}: a low-rank predictor's rank is at most {min(H, I)}")
    if not 0 <= args.min_hot_per_layer <= I:
        raise HotcoldError(f"--min-hot-per-layer must be in [0, {I}] (the model's neurons per layer)")


def _add_input_sites(args: argparse.Namespace, plan, corpus) -> None:
    """Per layer, input thresholds beside the neuron plan: attention's sites everywhere, the FFN's where the
    neuron plan leaves it dense on this machine (its predicted density above the sparse kernel's crossover),
    chosen on the model as it is served with the neuron plan applied, under the same perplexity budget."""
    from hotcold.engine.hybrid import HybridConfig, apply_hybrid
    from hotcold.engine.loader import load_model
    from hotcold.engine.perplexity import perplexity
    from hotcold.profiler.input_plan import profile_inputs

    served = load_model(args.model, device="cpu", activation=args.activation, quantize=args.quantize)
    cfg = _input_config(args, served.config)
    dense = perplexity(served.model, corpus.evaluation, cfg.eval_context)
    apply_hybrid(served.model, plan, HybridConfig(mode="predictor", placement="cpu"), served.fingerprint)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"hotcold profile: {msg}", file=sys.stderr))
    result = profile_inputs(served, corpus, cfg, say, dense_ppl=dense)
    for lp, found in zip(plan.layers, result.plan.layers):
        lp.inputs = found.inputs
    plan.targets["inputs"] = result.plan.targets
    plan.perplexity.update(served_dense=dense, predictor_and_input=result.plan.perplexity["input"],
                           input_skipped=result.plan.perplexity["input_skipped"])
    plan.stats["inputs"] = result.plan.stats


def _input_config(args: argparse.Namespace, mcfg):
    from hotcold.profiler.input_plan import InputProfileConfig

    return InputProfileConfig(max_ppl_increase=0.01 if args.max_ppl_increase is None else args.max_ppl_increase,
                              calibration_tokens=min(args.tokens, 4096), min_sparsity=args.min_site_sparsity,
                              seq_len=min(256, mcfg.max_position_embeddings),
                              eval_context=min(1024, mcfg.max_position_embeddings))


def _run_input(args: argparse.Namespace, loaded) -> int:
    """--sparsity input: the model as it is served (a GGUF's blocks stay quantized), TEAL thresholds."""
    from hotcold.engine.plan import save_plan
    from hotcold.profiler.corpus import build_corpus
    from hotcold.profiler.input_plan import profile_inputs

    if args.cett is not None:
        raise HotcoldError("--cett sets neuron thresholds; input sparsity takes --max-ppl-increase")
    cfg = _input_config(args, loaded.config)
    corpus = build_corpus(loaded.tokenizer, args.corpus, args.tokens, args.eval_tokens)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"hotcold profile: {msg}", file=sys.stderr))
    result = profile_inputs(loaded, corpus, cfg, say)
    clear_report(args.out)
    save_plan(result.plan, args.out)
    if not args.no_report:
        from hotcold.profiler.report import write_input_report

        write_input_report(result, args.out)
    plan = result.plan
    ppl = plan.perplexity
    print(f"plan written to {args.out} ({len(plan.layers)} layers, input sparsity)\n"
          f"block sparsity {plan.targets['block_sparsity']:.2f}: {ppl['input_skipped']:.1%} of the projections' "
          f"weights skipped on held-out text\nheld-out perplexity: dense {ppl['dense']:.3f}, input "
          f"{ppl['input']:.3f} ({ppl['input'] / ppl['dense'] - 1:+.2%})")
    return 0


def _print_summary(result, out: Path) -> None:
    from hotcold.engine.placement import fmt_bytes

    plan = result.plan
    ppl, pl, tg = plan.perplexity, plan.placement, plan.targets
    sp = [lp.sparsity for lp in plan.layers]
    pred = [lp.predictor for lp in plan.layers if lp.predictor is not None]
    lines = [
        f"plan written to {out} ({len(plan.layers)} layers, {plan.corpus['calibration_tokens']} calibration "
        f"tokens, {result.timings['total']:.0f} s)",
        f"thresholds: {tg['allocation']} allocation, mean CETT {tg['mean_cett']:.3f}; FFN sparsity "
        f"mean {sum(sp) / len(sp):.3f} (min {min(sp):.3f}, max {max(sp):.3f})",
        f"held-out perplexity: dense {ppl['dense']:.3f}, oracle {ppl['oracle']:.3f} "
        f"({ppl['oracle'] / ppl['dense'] - 1:+.2%}), predictor {ppl['predictor']:.3f} "
        f"({ppl['predictor'] / ppl['dense'] - 1:+.2%})",
    ]
    if pred:
        lines.append(f"predictors: recall {sum(p.recall for p in pred) / len(pred):.3f}, sparsity "
                     f"{sum(p.sparsity for p in pred) / len(pred):.3f}, ranks "
                     f"{min(p.rank for p in pred)}..{max(p.rank for p in pred)}")
    lines.append(f"placement: {pl['hot_neurons']}/{pl['total_neurons']} neurons hot "
                 f"({fmt_bytes(pl['hot_bytes'])} GPU + {fmt_bytes(pl['reserved_bytes'])} dense; "
                 f"{fmt_bytes(pl['cold_bytes'])} CPU), serving {pl['served_share']:.1%} of activations")
    if "predictor_and_input" in ppl:
        lines.append(f"input thresholds beside the predictors (served model): {ppl['input_skipped']:.1%} of the "
                     f"projections' weights skipped; perplexity {ppl['served_dense']:.3f} dense -> "
                     f"{ppl['predictor_and_input']:.3f} ({ppl['predictor_and_input'] / ppl['served_dense'] - 1:+.2%})")
    print("\n".join(lines), file=sys.stdout)
