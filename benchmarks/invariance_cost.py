"""What load-independent results cost: the default (quantized) model with every step through the one-call
native block and head (each token summed in a fixed order: its tokens and logprobs do not depend on what
shares its step) against the per-op path, whose products switch to dequantized tiles and torch's GEMMs past
the calibrated token count (faster for many tokens, but each token's sums then depend on the batch).

    python benchmarks/invariance_cost.py [--model default] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from hotcold.engine import model as model_module
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from decode_cpu import cpu_line  # noqa: E402


def batch_run(loaded, num_seqs: int, prompt_len: int, new_tokens: int, salt: int) -> dict:
    """num_seqs requests at once; prefill tok/s of a lone prompt_len prompt and decode tok/s of the batch."""
    engine = LLMEngine(loaded, max_num_seqs=num_seqs, max_model_len=prompt_len + new_tokens + 8,
                       enable_prefix_caching=False)
    vocab = loaded.config.vocab_size
    ids = [[(i * 7919 + s * 104729 + salt) % (vocab - 10) + 5 for i in range(prompt_len)] for s in range(num_seqs)]
    engine.add_request("p", ids[0], SamplingParams(max_tokens=1))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    prefill = prompt_len / (time.perf_counter() - t0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for s, p in enumerate(ids):
        engine.add_request(f"d{s}", p[:32], params)
    while any(seq.num_pending > 1 for seq in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    t0, made = time.perf_counter(), 0
    while engine.has_unfinished():
        made += len(engine.step())
    return {"prefill_tok_s": prefill, "decode_tok_s": made / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/invariance_cost.json")
    args = ap.parse_args()
    loaded = load_model(args.model)
    rows = []
    for r in range(args.rounds):  # A/B per round
        for invariant in (True, False):
            model_module.NATIVE_BLOCKS = invariant
            for n in (1, 16):
                rows.append({"round": r, "invariant": invariant, "num_seqs": n,
                             **batch_run(loaded, n, 512, 64, salt=r * 100 + n)})
    print(f"\n{cpu_line()}\nmodel {args.model}: prefill of one 512-token prompt; decode of n sequences x 64 tokens")
    print(f"{'path':34s} {'seqs':>4s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    summary = []
    for invariant in (True, False):
        for n in (1, 16):
            sel = [x for x in rows if x["invariant"] == invariant and x["num_seqs"] == n]
            pre = statistics.median(x["prefill_tok_s"] for x in sel)
            dec = statistics.median(x["decode_tok_s"] for x in sel)
            summary.append({"invariant": invariant, "num_seqs": n, "prefill_tok_s": pre, "decode_tok_s": dec})
            name = "native block (load-independent)" if invariant else "per-op, calibrated (batch-dependent)"
            print(f"{name:34s} {n:4d} {pre:14.1f} {dec:13.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": cpu_line(), "rows": rows, "summary": summary,
                               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
