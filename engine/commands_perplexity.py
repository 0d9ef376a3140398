"""`hotcold perplexity`: the model's perplexity over a text file — how the cost of sparsity is judged."""

from __future__ import annotations

import argparse
from pathlib import Path

from hotcold.engine.commands_generate import KVReserve, add_model_arguments, load_from_args
from hotcold.engine.errors import HotcoldError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, type=Path, help="a UTF-8 text file")
    parser.add_argument("--context", type=int, default=None,
                        help="window length in tokens (default: 1024, or the model's context if shorter)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")


def run(args: argparse.Namespace) -> int:
    from hotcold.engine.perplexity import perplexity

    if not args.text.is_file():
        raise HotcoldError(f"{args.text}: no such file")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HotcoldError(f"{args.text}: not UTF-8 text") from None
    if args.max_tokens is not None and args.max_tokens < 2:
        raise HotcoldError(f"--max-tokens {args.max_tokens}: a perplexity needs at least 2 tokens")
    loaded = load_from_args(args, KVReserve(0, 0, ""))  # scored without a KV cache
    longest = loaded.config.max_position_embeddings
    if args.context is not None and args.context > longest:
        raise HotcoldError(f"--context {args.context}: this model's maximum context is {longest} tokens")
    args.context = args.context or min(1024, longest)
    ids = loaded.tokenizer.encode(text)[: args.max_tokens]
    ppl = perplexity(loaded.model, ids, args.context)
    mode = f", sparsity {args.sparsity or 'predictor'} with plan {args.plan}" if args.plan else ""
    counters = getattr(loaded.model, "ffn_counters", None)
    skipped = f", {100 * counters.sparsity:.1f}% of FFN neurons skipped" if counters and counters.sparsity else ""
    print(f"perplexity {ppl:.4f} over {len(ids)} tokens (context {args.context}{mode}{skipped})")
    return 0
