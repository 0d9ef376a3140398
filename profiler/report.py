"""report.md and its PNG plots (matplotlib, Agg backend) inside the plan folder."""

from __future__ import annotations

from pathlib import Path

from hotcold.engine.placement import fmt_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(result, out_dir: str | Path) -> Path:
    """Write report.md and its plots; returns the report's path."""
    out = Path(out_dir)
    plan = result.plan
    L = len(plan.layers)
    idx = list(range(L))
    plt = _plt()
    figs: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        figs.append((name, title))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(idx, [lp.sparsity for lp in plan.layers], color="#4c72b0", label="sparsity (calibration)")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of neurons inactive")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(idx, [lp.threshold for lp in plan.layers], "o-", color="#dd8452", ms=3, label="threshold")
    ax2.set_ylabel("magnitude threshold")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    save(fig, "sparsity_thresholds.png", "Per-layer sparsity and thresholds")

    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, s in enumerate(result.summaries):
        x, y = s.hot_cdf(101)
        ax.plot(x.numpy(), y.numpy(), color=cmap(i / max(L - 1, 1)), lw=1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("fraction of neurons (most frequent first)")
    ax.set_ylabel("fraction of activations served")
    ax.set_title("hot-neuron CDF (colour: layer 0 dark -> last light)", fontsize=9)
    save(fig, "hot_cdf.png", "Hot-neuron CDF per layer")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, c in enumerate(result.curves):
        ax.plot(c.cett.numpy(), c.sparsity.numpy(), color=cmap(i / max(L - 1, 1)), lw=1)
    ax.scatter([lp.cett for lp in plan.layers], [lp.sparsity for lp in plan.layers], s=8, c="red",
               zorder=3, label="chosen")
    ax.set_xlim(0, 0.5)
    ax.set_xlabel("mean CETT")
    ax.set_ylabel("sparsity (CETT sample)")
    ax.legend(fontsize=8)
    save(fig, "cett_sparsity.png", "CETT vs sparsity per layer")

    preds = [lp.predictor for lp in plan.layers]
    if all(p is not None for p in preds):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(idx, [p.recall for p in preds], "o-", ms=3, label="recall (threshold rule)")
        ax.plot(idx, [p.sparsity for p in preds], "s-", ms=3, label="predicted sparsity (threshold rule)")
        ax.plot(idx, [p.topk_recall for p in preds], "o--", ms=3, label="recall (top-k)")
        ax.plot(idx, [p.topk_sparsity for p in preds], "s--", ms=3, label="predicted sparsity (top-k)")
        ax.plot(idx, [lp.sparsity for lp in plan.layers], "k:", label="oracle sparsity")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "predictors.png", "Predictor recall and sparsity per layer (held-out)")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    hot = [lp.hot_count for lp in plan.layers]
    ax.bar(idx, hot, color="#c44e52", label="hot (GPU)")
    ax.bar(idx, [lp.num_neurons - h for lp, h in zip(plan.layers, hot)], bottom=hot, color="#8da0cb",
           label="cold (CPU)")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.legend(fontsize=8)
    save(fig, "placement.png", "Placement: hot and cold neurons per layer")

    if result.search is not None and result.search.points:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for strategy, marker in (("uniform", "o"), ("per-layer", "s")):
            pts = sorted((p for p in result.search.points if p.strategy == strategy), key=lambda p: p.sparsity)
            if pts:
                ax.plot([p.sparsity for p in pts], [100 * p.increase for p in pts], marker + "-", label=strategy)
        ax.axhline(100 * result.search.budget, color="k", ls=":", label="budget")
        ax.set_xlabel("measured FFN sparsity (held-out)")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.legend(fontsize=8)
        save(fig, "search.png", "The perplexity search: the points it evaluated")

    (out / "report.md").write_text(_markdown(result, figs))
    return out / "report.md"


def _markdown(result, figs: list[tuple[str, str]]) -> str:
    plan = result.plan
    ppl, pl, tg, m = plan.perplexity, plan.placement, plan.targets, plan.model
    stats = plan.stats.get("layers", [])
    lines = [
        f"# hotcold plan: {m.get('arch')} ({m.get('activation')}), {m.get('num_layers')} layers",
        "",
        f"- model: `{m.get('source')}` (fingerprint `{plan.fingerprint}`)",
        f"- corpus: {plan.corpus.get('description')}; {plan.corpus.get('calibration_tokens')} calibration "
        f"tokens, {plan.corpus.get('evaluation_tokens')} held out",
        "- target: " + (f"CETT {tg['cett']}" if tg.get("cett") is not None else
                         f"perplexity increase <= {100 * tg['max_ppl_increase']:.2f}%")
        + f"; allocation {tg['allocation']}, mean CETT {tg['mean_cett']:.4f}; predictor recall target "
        f"{tg['recall_target']}",
        f"- profiling time: {result.timings['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items() if k != "total") + ")",
        "",
        "## Held-out perplexity",
        "",
        "| FFN neurons | perplexity | vs dense | measured sparsity |",
        "|---|---|---|---|",
        f"| dense | {ppl['dense']:.4f} | | 0 |",
        f"| oracle thresholds | {ppl['oracle']:.4f} | {ppl['oracle'] / ppl['dense'] - 1:+.2%} | "
        f"{ppl['oracle_sparsity']:.3f} |",
        f"| predictors | {ppl['predictor']:.4f} | {ppl['predictor'] / ppl['dense'] - 1:+.2%} | "
        f"{ppl['predictor_sparsity']:.3f} |",
        "",
    ]
    if result.search is not None:
        lines += ["## Perplexity search", "", "| allocation | mean CETT | sparsity | perplexity | increase | ok |",
                  "|---|---|---|---|---|---|"]
        for p in result.search.points:
            lines.append(f"| {p.strategy} | {p.mean_cett:.4f} | {p.sparsity:.3f} | {p.perplexity:.4f} | "
                         f"{p.increase:+.2%} | {'yes' if p.feasible else 'no'} |")
        for k, v in result.search.best.items():
            lines.append(f"\nBest {k}: " + ("none within budget" if v is None else
                         f"mean CETT {v.mean_cett:.4f}, sparsity {v.sparsity:.3f}, increase {v.increase:+.2%}"))
        lines.append("")
    lines += [
        "## Placement", "",
        f"GPU budget {fmt_bytes(pl['gpu_memory_bytes'])}: dense parts {fmt_bytes(pl['reserved_bytes'])} ("
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in (pl.get("reserved") or {}).items())
        + f"); hot neurons {pl['hot_neurons']}/{pl['total_neurons']} = {fmt_bytes(pl['hot_bytes'])} on the GPU, "
        f"{fmt_bytes(pl['cold_bytes'])} on the CPU; hot neurons serve {pl['served_share']:.1%} of activations.",
        "",
        "## Per layer", "",
        "| layer | threshold | CETT | sparsity | reuse t-1 | reuse w8 | union w8 | 80% served by | co-act gap "
        "| rank | tau | recall | pred. sparsity | top-k | top-k recall | hot |",
        "|" + "---|" * 16,
    ]
    for lp, st in zip(plan.layers, stats):
        p = lp.predictor
        pred = (f"{p.rank} | {p.tau:.3f} | {p.recall:.3f} | {p.sparsity:.3f} | {p.top_k} | {p.topk_recall:.3f}"
                if p is not None else "- | - | - | - | - | -")
        lines.append(
            f"| {lp.index} | {lp.threshold:.4g} | {lp.cett:.3f} | {lp.sparsity:.3f} | "
            f"{st['reuse_consecutive']:.3f} | {st['reuse_window']:.3f} | {st['window_density']:.3f} | "
            f"{st['neurons_serving']['0.8']:.3f} | {st['coactivation_gap']:.3f} | {pred} | {lp.hot_count} |")
    lines += ["", "Columns: reuse t-1 = share of a token's active neurons also active on the previous token; "
              "reuse w8 = share already active in one of the previous 8 tokens; union w8 = density of the union "
              "of 8 consecutive tokens' active sets; 80% served by = fraction of neurons (most frequent first) "
              "serving 80% of activations; co-act gap = mean top-1% co-activation probability minus the mean.",
              ""]
    if any(lp.inputs is not None for lp in plan.layers):
        lines += _input_table(plan, "## Input thresholds beside the predictors")
    for name, title in figs:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def _input_table(plan, title: str) -> list[str]:
    """Per layer and site: the input threshold (0: dense) and the share of inputs it dropped on held-out text."""
    from hotcold.engine.input_sparsity import SITES

    lines = [title, "",
             "| layer | " + " | ".join(f"{s} threshold | {s} dropped" for s in SITES) + " |",
             "|" + "---|" * (1 + 2 * len(SITES))]
    for lp in plan.layers:
        t, sp = (lp.inputs.thresholds, lp.inputs.sparsity) if lp.inputs is not None else ({}, {})
        lines.append(f"| {lp.index} | " + " | ".join(f"{t.get(s, 0.0):.4g} | {sp.get(s, 0.0):.3f}" for s in SITES)
                     + " |")
    return lines + [""]


def write_input_report(result, out_dir: str | Path) -> Path:
    """report.md and input_sparsity.png for an input-sparsity plan (profiler.input_plan): per layer, the
    share of each site's inputs dropped on held-out text, and the search's perplexity per block sparsity."""
    from hotcold.engine.input_sparsity import SITES

    out = Path(out_dir)
    plan = result.plan
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1.3]})
    idx = list(range(len(plan.layers)))
    width = 0.8 / len(SITES)
    for k, site in enumerate(SITES):
        ax.bar([i + (k - 1.5) * width for i in idx], [lp.inputs.sparsity.get(site, 0.0) for lp in plan.layers],
               width, label=site)
    ax.set_xlabel("layer")
    ax.set_ylabel("inputs dropped (held-out)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=4)
    ev = sorted(result.evaluations, key=lambda e: e["block_sparsity"])
    ax2.plot([e["block_sparsity"] for e in ev], [100 * e["increase"] for e in ev], "o-")
    ax2.axhline(100 * plan.targets["max_ppl_increase"], color="k", ls=":", lw=0.8)
    ax2.set_xlabel("block sparsity (greedy level)")
    ax2.set_ylabel("perplexity increase (%)")
    fig.tight_layout()
    fig.savefig(out / "input_sparsity.png", dpi=90)
    plt.close(fig)
    ppl = plan.perplexity
    lines = [
        "# hotcold plan report: input sparsity", "",
        f"- model: {plan.model.get('source')} ({plan.model.get('arch')}, {plan.model.get('activation')})",
        f"- budget: {plan.targets['max_ppl_increase']:.2%} perplexity; chosen block sparsity "
        f"{plan.targets['block_sparsity']:.2f}; a site allocated under its crossover stays dense (the share of "
        "inputs dropped from which the input-sparse kernel beat the dense one on this model's matrices: "
        + ", ".join(f"{k} {v:.0%}" for k, v in plan.targets["min_site_sparsity"].items()) + ")",
        f"- held-out perplexity: dense {ppl['dense']:.4f}, input {ppl['input']:.4f} "
        f"({ppl['input'] / ppl['dense'] - 1:+.2%}); {ppl['input_skipped']:.1%} of the projections' weights "
        "skipped per token (layers averaged)", "",
    ]
    lines += _input_table(plan, "## Thresholds and inputs dropped, per layer and site")
    lines += ["## Inputs dropped per layer and site; perplexity along the search", "",
              "![input sparsity](input_sparsity.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
