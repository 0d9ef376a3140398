"""Corpus passes through the engine's model: FFN taps that see every layer's input x and activations h.

Sequences are batched into one flattened step (the engine's StepBatch, no KV cache) and no logits are
computed (`logits_indices` empty), so a profiling pass costs the transformer body only. Nothing
corpus-sized is kept: callbacks fold each batch into bounded state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hotcold.engine.errors import HotcoldError
from hotcold.engine.model import StepBatch
from hotcold.engine.sparsity import MaskedFFN, measured_sparsity, predicted_mask
from hotcold.profiler.predictor import magnitude_codes
from hotcold.profiler.stats import LayerCounter

Callback = Callable[[int, Tensor, Tensor], None]  # (layer, x [T, H], h [T, I])


class FFNTap(nn.Module):
    """A dense FFN that also hands (layer, x, h) to a callback; its output is unchanged."""

    def __init__(self, ffn: nn.Module, layer: int, callback: Callback) -> None:
        super().__init__()
        self.ffn, self.layer, self.callback = ffn, layer, callback

    def forward(self, x: Tensor) -> Tensor:
        h = self.ffn.activations(x)
        self.callback(self.layer, x, h)
        return self.ffn.project_down(h)


def dense_ffns(model: nn.Module) -> list[nn.Module]:
    """Every layer's dense FFN; mixture-of-experts models are refused."""
    out = []
    for i, block in enumerate(model.layers):
        ffn = block.ffn.ffn if isinstance(block.ffn, (FFNTap, MaskedFFN)) else block.ffn
        if not hasattr(ffn, "activations") or not hasattr(ffn, "down_t"):
            raise HotcoldError(f"layer {i} has a {type(ffn).__name__}, not a dense FFN: mixture-of-experts "
                               "models are not profiled")
        out.append(ffn)
    return out


@contextmanager
def replaced_ffns(model: nn.Module, make: Callable[[int, nn.Module], nn.Module]) -> Iterator[list[nn.Module]]:
    """Swap every layer's FFN for make(layer, dense_ffn) for the duration of the block."""
    originals = dense_ffns(model)
    for i, (block, ffn) in enumerate(zip(model.layers, originals, strict=True)):
        block.ffn = make(i, ffn)
    try:
        yield [block.ffn for block in model.layers]
    finally:
        for block, ffn in zip(model.layers, originals, strict=True):
            block.ffn = ffn


def batches(sequences: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    size = 0
    for s in sequences:
        if batch and size + len(s) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(s)
        size += len(s)
    if batch:
        yield batch


@torch.inference_mode()
def run_body(model: nn.Module, sequences: list[list[int]], batch_tokens: int = 1024,
             on_batch: Callable[[list[int]], None] | None = None, progress=None) -> None:
    """Run sequences through the transformer body (no lm_head), several per step."""
    empty = torch.zeros(0, dtype=torch.long, device=model.device)
    for batch in batches(sequences, batch_tokens):
        lengths = [len(s) for s in batch]
        if on_batch is not None:
            on_batch(lengths)
        ids = torch.tensor([t for s in batch for t in s], dtype=torch.long, device=model.device)
        model.forward(ids, StepBatch([[]] * len(batch), [0] * len(batch), lengths), logits_indices=empty)
        if progress is not None:
            progress.update(sum(lengths))


@dataclass
class ActivationSampler:
    """Keeps every `stride`-th token's activations h of every layer (float32), for CETT curves."""

    num_layers: int
    stride: int = 4
    samples: list[list[Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = [[] for _ in range(self.num_layers)]

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> None:
        self.samples[layer].append(h[:: self.stride].float().clone())

    def layer(self, i: int) -> Tensor:
        return torch.cat(self.samples[i])


class StatsCollector:
    """Phase 2: with thresholds fixed, counts activations per layer and keeps predictor training pairs for
    every `pair_stride`-th token, up to `max_pairs`: x as bfloat16 and uint8 magnitude codes relative to
    `references` (0 = inactive; see predictor.magnitude_codes)."""

    def __init__(self, ffns: list[nn.Module], thresholds: list[float], references: list[float] | None = None,
                 window: int = 8, coactivation_tokens: int = 4096, pair_stride: int = 2,
                 max_pairs: int = 12288) -> None:
        self.thresholds = thresholds
        self.references = references or [t if t > 0 else 1.0 for t in thresholds]
        self.down_norms = [f.down_t.detach().float().norm(dim=1) for f in ffns]
        sizes = [f.down_t.shape[0] for f in ffns]
        self.counters = [LayerCounter(n, window, coactivation_tokens) for n in sizes]
        self.pair_stride, self.max_pairs = pair_stride, max_pairs
        self.xs: list[list[Tensor]] = [[] for _ in ffns]
        self.codes: list[list[Tensor]] = [[] for _ in ffns]
        self.kept = [0] * len(ffns)
        self.lengths: list[int] = []

    def set_lengths(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> None:
        mag = h.float().abs() * self.down_norms[layer]
        a = mag > self.thresholds[layer]
        start = 0
        for n in self.lengths or [a.shape[0]]:
            self.counters[layer].update(a[start: start + n])
            start += n
        room = self.max_pairs - self.kept[layer]
        if room > 0:
            rows = torch.arange(0, a.shape[0], self.pair_stride)[:room]
            self.xs[layer].append(x[rows].to(torch.bfloat16).clone())
            self.codes[layer].append(magnitude_codes(mag[rows], a[rows], self.references[layer]).clone())
            self.kept[layer] += len(rows)

    def pairs(self, layer: int) -> tuple[Tensor, Tensor]:
        """(x float32 [N, H], magnitude codes uint8 [N, I]) kept for one layer; active = codes > 0."""
        return torch.cat(self.xs[layer]).float(), torch.cat(self.codes[layer])

    def release(self, layer: int) -> None:
        self.xs[layer], self.codes[layer] = [], []


def oracle_ffns(thresholds: list[float]) -> Callable[[int, nn.Module], nn.Module]:
    return lambda i, ffn: MaskedFFN(ffn, threshold=thresholds[i])


def perplexity_with(model: nn.Module, make: Callable[[int, nn.Module], nn.Module] | None, ids: list[int],
                    context: int) -> tuple[float, float | None]:
    """(perplexity over ids, measured FFN sparsity) with every FFN replaced by make(layer, ffn)."""
    from hotcold.engine.perplexity import perplexity

    if make is None:
        return perplexity(model, ids, context), None
    with replaced_ffns(model, make):
        ppl = perplexity(model, ids, context)
        return ppl, measured_sparsity(model)


class PredictorProbe(MaskedFFN):
    """Predictor-mode FFN that also scores its decisions against the oracle mask of the same h: recall
    and sparsity for the threshold rule (applied) and the top-k rule (only measured)."""

    def __init__(self, ffn: nn.Module, threshold: float, predictor, tau: float, top_k: int) -> None:
        super().__init__(ffn, predictor=predictor, tau=tau)
        self.oracle_threshold, self.k = threshold, top_k
        self.counts = torch.zeros(6, dtype=torch.float64)  # pos, tp_tau, pred_tau, tp_topk, pred_topk, n

    def mask(self, x: Tensor, h: Tensor) -> Tensor:
        oracle = h.float().abs() * self.down_norm > self.oracle_threshold
        logits = self.predictor(x.to(self.predictor.fc1.weight.dtype))  # once for both rules:
        m = predicted_mask(logits, tau=self.tau)  # the executor's rule (LowRankPredictor.predict)
        topk = predicted_mask(logits, top_k=self.k)
        self.counts += torch.tensor([oracle.sum(), (m & oracle).sum(), m.sum(), (topk & oracle).sum(),
                                     topk.sum(), m.numel()], dtype=torch.float64)
        return m

    def metrics(self) -> dict[str, float]:
        pos, tp, pred, tpk, predk, n = self.counts.tolist()
        return {"recall": tp / pos if pos else 1.0, "sparsity": 1 - pred / n if n else 0.0,
                "topk_recall": tpk / pos if pos else 1.0, "topk_sparsity": 1 - predk / n if n else 0.0}


@torch.inference_mode()
def layer_sensitivity(model: nn.Module, thresholds: list[float], sequences: list[list[int]],
                      progress=None) -> list[float]:
    """Mean KL(dense || one layer sparsified) over the tokens of `sequences`, for each layer alone at its
    threshold: how much the model's predictions move per layer (the per-layer allocation's cost)."""
    import torch.nn.functional as F

    def logprobs() -> Tensor:
        return torch.cat([F.log_softmax(model.forward_sequence(torch.tensor(s)), dim=-1) for s in sequences])

    dense = logprobs()
    out = []
    for i, block in enumerate(model.layers):
        ffn = block.ffn
        block.ffn = MaskedFFN(ffn, threshold=thresholds[i])
        try:
            sparse = logprobs()
        finally:
            block.ffn = ffn
        out.append(float((dense.exp() * (dense - sparse)).sum(-1).mean()))
        if progress is not None:
            progress.update(1)
    return out
