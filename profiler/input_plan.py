"""`hotcold profile --sparsity input`: TEAL's training-free input thresholds, chosen under a perplexity budget.

1. Histograms of |input| at every site of every block (qkv, o, gate_up, down) over calibration text: a
   site's threshold for sparsity s is the s-quantile of its inputs' magnitudes.
2. TEAL's greedy per-block allocation: from all-dense, each step raises the sparsity of the one site whose
   raise (by the same number of skipped weights) adds the least error to the block's output on calibration
   tokens; the path of allocations is kept per block, indexed by block sparsity.
3. Sites whose allocated sparsity is under the crossover of the input-sparse kernel stay dense: they would
   cost time, and dropping nothing costs no quality. The crossover is measured per site on the model's own
   matrices, every layer's in turn (from memory, as decode reads them): on the default model's small
   matrices the sparse kernel needs more dropped than on a 7B model's.
4. The largest block sparsity (one level for every block) whose held-out perplexity, measured exactly as
   `hotcold perplexity --plan` measures it, stays within the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hotcold.engine import input_sparsity
from hotcold.engine.input_sparsity import SITES
from hotcold.engine.perplexity import perplexity
from hotcold.engine.plan import InputPlan, LayerPlan, Plan
from hotcold.profiler.corpus import Corpus


@dataclass
class InputProfileConfig:
    max_ppl_increase: float = 0.01
    calibration_tokens: int = 4096  # histogram tokens
    block_tokens: int = 256  # tokens whose block outputs the greedy allocation compares
    step: float = 0.05  # site sparsity added per greedy step
    levels: float = 0.05  # block sparsities the search tries: multiples of this
    max_sparsity: float = 0.8
    min_sparsity: float | None = None  # a site allocated less stays dense (None: measured per site)
    seq_len: int = 256
    eval_context: int = 1024


class Histograms:
    """|x| per (layer, site) in log-spaced bins, exact zeros apart: quantiles without keeping the samples."""

    BINS, LO, HI = 4096, -10.0, 4.0  # log10 |x|: 0.34% wide bins

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.zeros: dict[tuple[int, str], float] = {}

    def add(self, layer: int, site: str, x: torch.Tensor) -> None:
        v = x.detach().float().abs().flatten()
        key = (layer, site)
        nz = v[v > 0]
        logs = nz.log10().clamp(self.LO, self.HI - 1e-6)
        self.counts[key] = self.counts.get(key, 0) + torch.histc(logs, self.BINS, self.LO, self.HI)
        self.zeros[key] = self.zeros.get(key, 0.0) + float(v.numel() - nz.numel())

    def quantile(self, layer: int, site: str, q: float) -> float:
        """The magnitude t with a fraction q of the inputs at or under it (0 when the zeros alone reach q)."""
        counts, zeros = self.counts[(layer, site)].double(), self.zeros[(layer, site)]
        total = zeros + float(counts.sum())
        target = q * total
        if target <= zeros or total == 0:
            return 0.0
        cum = zeros + counts.cumsum(0)
        b = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))), self.BINS - 1)
        before = zeros if b == 0 else float(cum[b - 1])
        frac = (target - before) / max(float(counts[b]), 1e-12)
        width = (self.HI - self.LO) / self.BINS
        return float(10 ** (self.LO + (b + min(max(frac, 0.0), 1.0)) * width))


def site_params(block) -> dict[str, int]:
    """Weights behind each site a block has (what dropping one of its inputs saves, summed over outputs; no
    FFN sites where the FFN runs a neuron plan)."""
    return {s: math.prod(m.shape) for s, m in input_sparsity.site_matrices(block).items()}


@dataclass
class InputProfile:
    plan: Plan

    @property
    def paths(self) -> list[list[dict[str, float]]]:
        """Per layer, the greedy allocations in order (site -> sparsity)."""
        return self.plan.stats["paths"]

    @property
    def evaluations(self) -> list[dict[str, float]]:
        """The search's evaluations: level, block sparsity, perplexity, increase over dense."""
        return self.plan.stats["evaluations"]


def _capture_block_args(model, ids: list[int]) -> list[tuple]:
    """Each block's positional arguments on one sequence (the per-op path, no KV cache)."""
    captured: list[tuple] = [()] * len(model.layers)
    hooks = [block.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args))
             for i, block in enumerate(model.layers)]
    try:
        model.forward_sequence(torch.tensor(ids))
    finally:
        for h in hooks:
            h.remove()
    return captured


def greedy_path(model, layer: int, args: tuple, hist: Histograms, step: float, max_sparsity: float
                ) -> list[dict[str, float]]:
    """TEAL's greedy allocation for one block: from all-dense, raise one site's sparsity by `step` at a time,
    the site whose raise adds the least block-output error per weight skipped, until the block's sparsity
    (weighted by the sites' weights) reaches max_sparsity. Returns the allocations in order."""
    block = model.layers[layer]
    params = site_params(block)
    with torch.inference_mode():
        dense = block(*args)
    base = float((dense - args[0]).double().square().sum()) or 1.0

    def error(sparsity: dict[str, float]) -> float:
        thresholds = [{} for _ in model.layers]
        thresholds[layer] = {s: hist.quantile(layer, s, v) for s, v in sparsity.items() if v > 0}
        saved = input_sparsity.apply_input_sparsity(model, thresholds, input_major=False, layers=[layer])
        try:
            with torch.inference_mode():
                out = block(*args)
        finally:
            input_sparsity.restore(model, saved)
        return float((out - dense).double().square().sum()) / base

    current, err = {s: 0.0 for s in params}, 0.0
    path = [dict(current)]
    while block_sparsity(current, params) < max_sparsity:
        trials = []
        for site in params:
            if current[site] + step <= 0.95 + 1e-9:
                e = error({**current, site: current[site] + step})
                trials.append(((e - err) / params[site], e, site))
        if not trials:
            break
        _, err, site = min(trials)
        current = {**current, site: round(current[site] + step, 6)}
        path.append(dict(current))
    return path


def block_sparsity(sparsity: dict[str, float], params: dict[str, int]) -> float:
    """The share of a block's projection weights skipped: its sites' sparsities weighted by their weights."""
    return sum(params[s] * sparsity.get(s, 0.0) for s in params) / sum(params.values())


CROSSOVER_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FLUSH_BYTES = 96 << 20  # written between timed runs: past any last-level cache here


def measure_crossover(model) -> dict[str, float]:
    """Per site, the smallest share of dropped inputs (of CROSSOVER_SPARSITIES) from which the input-sparse
    products of every layer's matrix of that site, one after the other, beat the dense products at one token,
    at every larger share (1.0: never; also where the kernels do not take the matrices)."""
    gen = torch.Generator().manual_seed(0)
    evict = torch.ones(FLUSH_BYTES // 4)  # decode finds a layer's weights in DRAM, not in the caches

    def flush() -> None:
        evict.add_(1.0)

    out = {}
    for site in SITES:  # (a layer whose FFN runs a neuron plan has no FFN sites)
        mats = [m for b in model.layers if (m := input_sparsity.site_matrices(b).get(site)) is not None]
        out[site] = _site_crossover(mats, gen, flush) if mats else 1.0
    return out


def _site_crossover(mats: list, gen: torch.Generator, flush) -> float:
    """The kernels alone, as the native block calls them (no Python bookkeeping on either side)."""
    import torch.nn.functional as F

    from hotcold.kernels import input_sparse, quant
    from hotcold.kernels.calibrate import race

    def dense(m, x):
        return quant.dots(m, x) if isinstance(m, quant.QuantTensor) else F.linear(x.to(m.dtype), m)

    def sparse_product(w, x):
        if isinstance(w.weight, input_sparse.InputMajor):
            return input_sparse.linear(x, w.weight, w.threshold)
        return input_sparse.float_linear(x, w.weight, w.threshold)

    xs = [torch.randn(1, m.shape[1], generator=gen) for m in mats]
    sparse = [input_sparsity.input_major(m, 1.0) for m in mats]
    if any(w is None for w in sparse):
        return 1.0
    best = 1.0
    for share in sorted(CROSSOVER_SPARSITIES, reverse=True):
        for w, x in zip(sparse, xs):
            w.threshold = float(x.abs().quantile(share))
        with torch.inference_mode():
            a, b = race(lambda: [sparse_product(w, x) for w, x in zip(sparse, xs)],
                        lambda: [dense(m, x) for m, x in zip(mats, xs)], reps=3, flush=flush)
        if a >= b:
            break
        best = share
    return best


def _level(paths: list[list[dict[str, float]]], params: list[dict[str, int]], level: float,
           min_sparsity: dict[str, float]) -> list[dict[str, float]]:
    """Every block's allocation at one block sparsity (the last one of its path not above it), sites
    allocated under min_sparsity dense."""
    out = []
    for path, p in zip(paths, params):
        alloc = path[0]
        for a in path:
            if block_sparsity(a, p) <= level + 1e-9:
                alloc = a
        out.append({s: v for s, v in alloc.items() if v >= min_sparsity.get(s, 1.0) and v > 0})
    return out


def profile_inputs(loaded, corpus: Corpus, cfg: InputProfileConfig,
                   progress: Callable[[str], None] = lambda msg: None, dense_ppl: float | None = None
                   ) -> InputProfile:
    """An input-sparsity plan for the model as it is. `dense_ppl`: the dense model's held-out perplexity,
    when the model already runs a neuron plan (the budget is against dense; the plan's FFNs that run
    sparse have no FFN sites)."""
    model = loaded.model
    L = len(model.layers)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    progress("input histograms")
    hist = Histograms()
    seqs = corpus.sequences(cfg.seq_len)
    saved = input_sparsity.apply_input_sparsity(model, [{} for _ in range(L)], input_major=False, observe=hist.add)
    try:
        seen = 0
        with torch.inference_mode():
            for seq in seqs:
                if seen >= cfg.calibration_tokens:
                    break
                model.forward_sequence(torch.tensor(seq))
                seen += len(seq)
    finally:
        input_sparsity.restore(model, saved)

    timings["histograms"] = time.perf_counter() - t0
    progress("input-sparse crossover per site")
    t1 = time.perf_counter()
    min_sparsity = measure_crossover(model) if cfg.min_sparsity is None else {s: cfg.min_sparsity for s in SITES}
    timings["crossover"] = time.perf_counter() - t1
    progress("greedy allocation")
    block_ids = [t for seq in seqs[len(seqs) // 2:] for t in seq][: cfg.block_tokens]
    args = _capture_block_args(model, block_ids)
    paths = [greedy_path(model, i, args[i], hist, cfg.step, cfg.max_sparsity) for i in range(L)]
    del args
    timings["greedy"] = time.perf_counter() - t0 - timings["histograms"] - timings["crossover"]

    progress("perplexity search")
    params = [site_params(b) for b in model.layers]
    evals = corpus.evaluation
    base_ppl = perplexity(model, evals, cfg.eval_context)  # no input sparsity (level 0)
    dense_ppl = base_ppl if dense_ppl is None else dense_ppl
    evaluations: list[dict[str, float]] = []

    def thresholds_at(level: int) -> list[dict[str, float]]:
        sparsity = _level(paths, params, level * cfg.levels, min_sparsity)
        return [{s: hist.quantile(i, s, v) for s, v in alloc.items()} for i, alloc in enumerate(sparsity)]

    def evaluate(level: int) -> tuple[float, list[dict[str, float]]]:
        saved = input_sparsity.apply_input_sparsity(model, thresholds_at(level), input_major=True)
        try:
            ppl = perplexity(model, evals, cfg.eval_context)
            measured = input_sparsity.site_sparsity(model)
        finally:
            input_sparsity.restore(model, saved)
        evaluations.append({"level": level, "block_sparsity": level * cfg.levels, "perplexity": ppl,
                            "increase": ppl / dense_ppl - 1.0})
        return ppl, measured

    def fits(ppl: float) -> bool:
        return ppl / dense_ppl - 1.0 <= cfg.max_ppl_increase

    # bisection over levels: lo is within budget (level 0: no input sparsity), hi is not (unless it is the top)
    lo, hi = 0, int(round(cfg.max_sparsity / cfg.levels))
    best = (base_ppl, [{} for _ in range(L)])
    ppl, measured = evaluate(hi)
    if fits(ppl):
        lo, best = hi, (ppl, measured)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ppl, measured = evaluate(mid)
        if fits(ppl):
            lo, best = mid, (ppl, measured)
        else:
            hi = mid

    timings["search"] = time.perf_counter() - t0 - sum(timings.values())
    chosen = thresholds_at(lo)
    skipped = [sum(params[i][s] * best[1][i].get(s, 0.0) for s in params[i]) / sum(params[i].values())
               for i in range(L)]
    layers = []
    I = loaded.config.intermediate_size
    for i, thresholds in enumerate(chosen):
        layers.append(LayerPlan(index=i, threshold=0.0, cett=0.0, sparsity=0.0, num_neurons=I,
                                hot_ids=torch.zeros(0, dtype=torch.int64), frequency=torch.zeros(I),
                                inputs=InputPlan(thresholds, {s: best[1][i].get(s, 0.0) for s in thresholds})))
    mcfg = loaded.config
    plan = Plan(
        fingerprint=loaded.fingerprint, layers=layers,
        model={"source": loaded.source, "arch": mcfg.arch, "activation": mcfg.activation, "num_layers": L,
               "hidden_size": mcfg.hidden_size, "intermediate_size": I},
        corpus={"description": corpus.description, "calibration_tokens": min(seen, cfg.calibration_tokens),
                "evaluation_tokens": len(evals), "sources": corpus.sources[:50]},
        targets={"sparsity": "input", "max_ppl_increase": cfg.max_ppl_increase, "step": cfg.step,
                 "level": lo, "block_sparsity": lo * cfg.levels, "min_site_sparsity": min_sparsity},
        perplexity={"dense": dense_ppl, "input": best[0], "context": cfg.eval_context, "tokens": len(evals),
                    "input_skipped": sum(skipped) / L},
        stats={"paths": paths, "evaluations": evaluations, "skipped_per_layer": skipped, "timings_s": timings},
    )
    return InputProfile(plan)
