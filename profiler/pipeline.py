"""`hotcold profile` end to end: sample -> thresholds (CETT or perplexity budget) -> streamed statistics ->
predictors -> held-out evaluation -> placement -> plan.

Memory stays bounded: the CETT sample (`cett_tokens` tokens per layer), co-activation counts (I x I per
layer) and predictor pairs (`max_pairs` tokens per layer, x in bfloat16, masks bit-packed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hotcold.engine import placement
from hotcold.engine.errors import HotcoldError
from hotcold.engine.plan import LayerPlan, Plan, PredictorPlan
from hotcold.engine.sparsity import LowRankPredictor
from hotcold.profiler import collect, predictor, search
from hotcold.profiler.corpus import Corpus
from hotcold.profiler.stats import CettSample, LayerSummary

RELU_FAMILY = {"relu", "reglu", "drelu", "relu2", "fatrelu"}


@dataclass
class ProfileConfig:
    cett: float | None = None  # a fixed CETT target ...
    max_ppl_increase: float | None = None  # ... or a perplexity budget (0.01 when neither is given)
    allocation: str = "auto"  # uniform | per-layer | auto (--cett: uniform; search: the better of both)
    recall_target: float | None = None  # None: 0.99 for ReLU-family models, 0.95 otherwise
    predictor_rank: int | None = None
    predictor_budget: float = 0.1  # all predictors together <= this fraction of FFN parameters
    train: predictor.TrainConfig = field(default_factory=predictor.TrainConfig)
    seq_len: int = 256
    batch_tokens: int = 1024
    cett_tokens: int = 1024  # CETT sample per layer
    sample_stride: int = 4
    bands: int = 128
    max_pairs: int = 12288  # predictor pairs per layer
    sensitivity_cett: float = 0.1  # CETT at which each layer's sensitivity is probed
    eval_context: int = 1024
    search_evals: int = 6
    gpu_memory: int | None = 8 * 1024**3
    gpu_dtype_bytes: int = 2
    context: int = 4096
    batch: int = 1
    min_hot_per_layer: int = 0
    seed: int = 0


@dataclass
class ProfileResult:
    plan: Plan
    summaries: list[LayerSummary]
    curves: list[Any]  # CettCurve per layer
    search: search.SearchResult | None
    timings: dict[str, float]
    weights: list[float] | None = None  # per-layer sensitivities used by the per-layer allocation


class _Progress:
    """tqdm bars to stderr, one per stage (quiet: none)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def bar(self, total: int, desc: str, unit: str = "tok"):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, leave=False, dynamic_ncols=True)


def check_budget(model, gpu_memory: int | None, dtype_bytes: int, predictor_params: int, context: int,
                 batch: int, min_per_layer: int = 0) -> None:
    """Refuse, before any profiling, a GPU budget that cannot hold the dense parts (with the predictors'
    parameters known so far) and the per-layer minimum: placement's own check, run on zero frequencies."""
    n = model.config.intermediate_size
    placement.place_for_budget(model, [torch.zeros(n)] * len(model.layers), gpu_memory, dtype_bytes,
                               predictor_params, context, batch, min_per_layer)


def profile(loaded, corpus: Corpus, cfg: ProfileConfig, quiet: bool = False) -> ProfileResult:
    mcfg = loaded.config
    if getattr(mcfg, "num_experts", 0):
        raise HotcoldError("mixture-of-experts models are not profiled: plans cover dense FFNs only")
    H, I = mcfg.hidden_size, mcfg.intermediate_size
    ffn_params = (3 if mcfg.gated else 2) * H * I
    limit = predictor.max_rank(H, I, ffn_params, cfg.predictor_budget)
    ranks = [cfg.predictor_rank] if cfg.predictor_rank else predictor.candidate_ranks(limit)
    check_budget(loaded.model, cfg.gpu_memory, cfg.gpu_dtype_bytes,  # the predictors at their smallest rank
                 len(loaded.model.layers) * LowRankPredictor.num_params(H, min(ranks), I), cfg.context, cfg.batch,
                 cfg.min_hot_per_layer)
    torch.manual_seed(cfg.seed)
    model = loaded.model
    ffns = collect.dense_ffns(model)
    L = len(ffns)
    relu_family = mcfg.activation in RELU_FAMILY
    recall_target = cfg.recall_target or (0.99 if relu_family else 0.95)
    prog = _Progress(quiet)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. CETT sample: every `sample_stride`-th token of sequences spread over the calibration corpus
    seqs = corpus.sequences(cfg.seq_len)
    n_sample = min(len(seqs), max(1, math.ceil(cfg.cett_tokens * cfg.sample_stride / cfg.seq_len)))
    pick = [seqs[round(i * (len(seqs) - 1) / max(n_sample - 1, 1))] for i in range(n_sample)]
    sampler = collect.ActivationSampler(L, cfg.sample_stride)
    with prog.bar(sum(map(len, pick)), "CETT sample") as bar, \
            collect.replaced_ffns(model, lambda i, f: collect.FFNTap(f, i, sampler)):
        collect.run_body(model, pick, cfg.batch_tokens, progress=bar)
    samples = []
    for i in range(L):
        samples.append(CettSample(sampler.layer(i)[: cfg.cett_tokens], ffns[i].down_t, bands=cfg.bands))
        sampler.samples[i] = []
    curves = [s.curve for s in samples]
    timings["cett_sample"] = time.perf_counter() - t0

    # 2. thresholds: a fixed CETT target, or the search under a perplexity budget
    t1 = time.perf_counter()
    evals = corpus.evaluation
    with prog.bar(len(evals), "dense perplexity") as bar:
        dense_ppl, _ = collect.perplexity_with(model, None, evals, cfg.eval_context)
        bar.update(len(evals))

    strategies = search.STRATEGIES if cfg.allocation == "auto" else (cfg.allocation,)
    if cfg.cett is not None:
        strategies = ("per-layer",) if cfg.allocation == "per-layer" else ("uniform",)
    weights = kl = None
    if "per-layer" in strategies:  # per-layer sensitivity: KL from dense with one layer sparsified
        probe_seqs = [seqs[round(f * (len(seqs) - 1))] for f in (0.3, 0.7)][: max(1, min(2, len(seqs)))]
        idx = [c.index(cfg.sensitivity_cett) for c in curves]
        with prog.bar(L, "layer sensitivity", unit="layer") as bar:
            kl = collect.layer_sensitivity(model, [float(c.thresholds[i]) for c, i in zip(curves, idx)],
                                           probe_seqs, progress=bar)
        weights = [k / max(float(c.cett[i]), 1e-3) ** 2 for k, c, i in zip(kl, curves, idx)]

    def evaluate(alloc: search.Allocation) -> tuple[float, float]:
        return collect.perplexity_with(model, collect.oracle_ffns(alloc.thresholds), evals, cfg.eval_context)

    search_result = None
    if cfg.cett is not None:  # exact thresholds: the largest t with sample CETT <= the target
        alloc = search.allocate(curves, cfg.cett, strategies[0], weights)
        if strategies[0] == "uniform":
            alloc.thresholds = [s.threshold(cfg.cett) for s in samples]
            alloc.sample_sparsity = [s.sparsity_of(t) for s, t in zip(samples, alloc.thresholds)]
        oracle_ppl, oracle_sparsity = evaluate(alloc)
    else:
        budget = 0.01 if cfg.max_ppl_increase is None else cfg.max_ppl_increase
        with prog.bar(len(strategies) * cfg.search_evals, "perplexity search", unit="eval") as bar:
            search_result = search.search(curves, evaluate, dense_ppl, budget, strategies,
                                          max_evals=cfg.search_evals, on_point=lambda p: bar.update(1),
                                          weights=weights)
        chosen = search_result.chosen
        if chosen is None:  # nothing within budget: keep only what contributes nothing (t = 0)
            alloc = search.allocate(curves, 0.0, "uniform")
            oracle_ppl, oracle_sparsity = evaluate(alloc)
        else:
            alloc = search.allocate(curves, chosen.mean_cett, chosen.strategy, weights)
            oracle_ppl, oracle_sparsity = chosen.perplexity, chosen.sparsity
    thresholds = alloc.thresholds
    references = [t if t > 0 else _median_active(s) for s, t in zip(samples, thresholds)]
    samples.clear()  # frees the CETT sample before the statistics pass
    timings["thresholds"] = time.perf_counter() - t1

    # 3. streamed statistics and predictor pairs over the whole calibration corpus
    t2 = time.perf_counter()
    n_tokens = sum(map(len, seqs))
    stride = max(1, n_tokens // cfg.max_pairs)
    stats = collect.StatsCollector(ffns, thresholds, references, pair_stride=stride,
                                   max_pairs=cfg.max_pairs)
    with prog.bar(n_tokens, "statistics") as bar, \
            collect.replaced_ffns(model, lambda i, f: collect.FFNTap(f, i, stats)):
        collect.run_body(model, seqs, cfg.batch_tokens, on_batch=stats.set_lengths, progress=bar)
    summaries = [c.summary() for c in stats.counters]
    timings["statistics"] = time.perf_counter() - t2

    # 4. predictors
    t3 = time.perf_counter()
    fitted: list[predictor.FittedPredictor] = []
    with prog.bar(L, "predictors", unit="layer") as bar:
        for i in range(L):
            x, codes = stats.pairs(i)
            stats.release(i)
            y = codes > 0
            n_val = max(1, len(x) // 5)
            tc = predictor.TrainConfig(**{**vars(cfg.train), "seed": cfg.seed + i})
            fitted.append(predictor.fit_layer(x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], recall_target,
                                              ranks, tc, codes_train=codes[:-n_val]))
            bar.update(1)
    timings["predictors"] = time.perf_counter() - t3

    # 5. held-out evaluation of the predictors (oracle masks of the same h as the reference)
    t4 = time.perf_counter()
    probes: list[collect.PredictorProbe] = []

    def make_probe(i: int, ffn):
        fp = fitted[i]
        probe = collect.PredictorProbe(ffn, thresholds[i], fp.module, fp.tau, fp.top_k)
        probes.append(probe)
        return probe

    with prog.bar(len(evals), "predictor perplexity") as bar:
        pred_ppl, pred_sparsity = collect.perplexity_with(model, make_probe, evals, cfg.eval_context)
        bar.update(len(evals))
    held_out = [p.metrics() for p in probes]
    timings["evaluation"] = time.perf_counter() - t4

    # 6. placement
    pred_params = sum(LowRankPredictor.num_params(H, f.module.rank, I) for f in fitted)
    freqs = [s.frequency for s in summaries]
    budget = placement.place_for_budget(model, freqs, cfg.gpu_memory, cfg.gpu_dtype_bytes, pred_params, cfg.context,
                                        cfg.batch, cfg.min_hot_per_layer)
    place, parts, reserved, nbytes = budget.placement, budget.parts, budget.reserved, budget.neuron_bytes
    timings["total"] = time.perf_counter() - t0

    # 7. the plan
    layers = []
    for i in range(L):
        fp, ho = fitted[i], held_out[i]
        pp = PredictorPlan(rank=fp.module.rank, tau=fp.tau, top_k=fp.top_k, recall=ho["recall"],
                           sparsity=ho["sparsity"], topk_recall=ho["topk_recall"],
                           topk_sparsity=ho["topk_sparsity"], weights=fp.module.export())
        layers.append(LayerPlan(index=i, threshold=thresholds[i], cett=alloc.targets[i],
                                sparsity=summaries[i].sparsity, num_neurons=I, hot_ids=place.hot_ids[i],
                                frequency=summaries[i].frequency.float(), predictor=pp))
    plan = Plan(
        fingerprint=loaded.fingerprint,
        layers=layers,
        model={"source": loaded.source, "arch": mcfg.arch, "activation": mcfg.activation, "num_layers": L,
               "hidden_size": H, "intermediate_size": I, "dtype": str(model.dtype).removeprefix("torch.")},
        corpus={"description": corpus.description, "calibration_tokens": n_tokens,
                "evaluation_tokens": len(evals), "sources": corpus.sources[:50]},
        targets={"cett": cfg.cett, "max_ppl_increase": None if cfg.cett is not None else
                 (0.01 if cfg.max_ppl_increase is None else cfg.max_ppl_increase),
                 "allocation": alloc.strategy, "mean_cett": alloc.mean_cett, "recall_target": recall_target,
                 "predictor_budget": cfg.predictor_budget, "seed": cfg.seed},
        placement={"gpu_memory_bytes": cfg.gpu_memory, "gpu_dtype_bytes": cfg.gpu_dtype_bytes,
                   "context": cfg.context, "batch": cfg.batch, "reserved_bytes": reserved,
                   "reserved": parts if cfg.gpu_memory != 0 else {}, "neuron_bytes": nbytes,
                   "hot_bytes": place.hot_bytes, "cold_bytes": place.cold_bytes,
                   "hot_neurons": sum(place.hot_counts), "total_neurons": L * I,
                   "served_share": place.served / place.total if place.total else 0.0,
                   "min_hot_per_layer": cfg.min_hot_per_layer},
        perplexity={"dense": dense_ppl, "oracle": oracle_ppl, "predictor": pred_ppl,
                    "oracle_sparsity": oracle_sparsity, "predictor_sparsity": pred_sparsity,
                    "context": cfg.eval_context, "tokens": len(evals)},
        stats=_stats(summaries, curves, fitted, search_result, timings, kl),
    )
    return ProfileResult(plan, summaries, curves, search_result, timings, weights)


def _median_active(sample: CettSample) -> float:
    """Median magnitude of the sample's non-zero activations: the code reference when the threshold is 0."""
    m = sample.mags[sample.mags > 0]
    return float(m.median()) if m.numel() else 1.0


def _stats(summaries, curves, fitted, search_result, timings, kl) -> dict[str, Any]:
    layers = []
    for i, (s, c, f) in enumerate(zip(summaries, curves, fitted)):
        keep = torch.linspace(0, len(c.thresholds) - 1, min(33, len(c.thresholds))).round().long().unique()
        layers.append({
            "reuse_consecutive": s.reuse_consecutive, "reuse_window": s.reuse_window,
            "window_density": s.window_density, "coactivation_gap": s.coactivation_gap,
            "neurons_serving": {str(q): s.neurons_serving(q) for q in (0.5, 0.8, 0.9, 0.99)},
            "cett_curve": {"threshold": c.thresholds[keep].tolist(), "cett": c.cett[keep].tolist(),
                           "sparsity": c.sparsity[keep].tolist()},
            "sensitivity_kl": None if kl is None else kl[i],
            "predictor_validation": {"recall": f.val_recall, "sparsity": f.val_sparsity,
                                     "ranks_tried": {str(k): v for k, v in f.tried.items()}},
        })
    out: dict[str, Any] = {"layers": layers, "timings_s": timings}
    if search_result is not None:
        out["search"] = {"budget": search_result.budget, "dense": search_result.dense_perplexity,
                         "points": [vars(p) for p in search_result.points],
                         "best": {k: (None if v is None else vars(v)) for k, v in search_result.best.items()}}
    return out

