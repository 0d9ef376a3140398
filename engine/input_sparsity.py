"""Input sparsity (TEAL): before a projection, drop the inputs whose magnitude is under a calibrated threshold
and read only the weight columns of the rest. The mask is exact (the input is known before the product), so
no predictor is needed, and every projection can be sparse, attention's included.

Four sites per block, one per distinct input: `qkv` (the normed block input, shared by q, k and v), `o` (the
attention output), `gate_up` (the normed FFN input, shared by gate and up) and `down` (the activations h).
A site with threshold 0 stays dense.

`SparseInput` wraps a projection's weight: over an input-major matrix (kernels.input_sparse: quantized blocks
rearranged, or a float W^T; one copy of the weight) it runs the input-sparse kernels (on the CPU, or Triton's
gathered axpy on CUDA); over a weight kept as it is, it masks the input and runs the dense product (the
reference: profiling, and formats the kernels do not take).
Which tokens are sparse: the native block path (quantized pre-norm models, with a KV cache) sparsifies decode
tokens and, with `prefill`, prompt tokens too; the per-op path (perplexity, profiling, other models)
sparsifies every token, which is what decode sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hotcold.engine.errors import HotcoldError
from hotcold.kernels import gathered_down, input_sparse, quant
from hotcold.kernels.input_sparse import FloatInputMajor, InputMajor
from hotcold.kernels.quant import QuantTensor

SITES = ("qkv", "o", "gate_up", "down")
Observer = Callable[[torch.Tensor], None]  # sees a site's inputs [T, in] (the profiler's histograms)


@dataclass
class SparseInput:
    """A projection's weight [out, in] whose inputs with |x| <= threshold are dropped."""

    weight: torch.Tensor | QuantTensor | InputMajor | FloatInputMajor
    threshold: float
    kept: float = field(default=0.0, repr=False)  # inputs kept / seen on the per-op path (not the native one)
    seen: float = field(default=0.0, repr=False)
    observer: Observer | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W . keep(x) (+ bias) for every token of x [T, in]; fp32 over quantized weights."""
        x2 = x.reshape(-1, x.shape[-1])
        if self.observer is not None:
            self.observer(x2)
        keep = x2.abs() > self.threshold
        self.kept += float(keep.sum())
        self.seen += keep.numel()
        if isinstance(self.weight, InputMajor):
            y = input_sparse.linear(x2, self.weight, self.threshold)
        elif isinstance(self.weight, FloatInputMajor):
            y = input_sparse.float_linear(x2, self.weight, self.threshold)
        elif isinstance(self.weight, QuantTensor):
            y = quant.linear(x2 * keep, self.weight)
        else:
            y = F.linear(x2 * keep, self.weight)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x * (x.abs() > threshold) if threshold > 0 else x


class InputMaskedFFN(nn.Module):
    """A float DenseFFN with its gate/up inputs and its down inputs (h) thresholded. Its down_t [I, H] is
    input-major already: with `gathered`, the down product reads only the kept neurons' rows (gathered axpy);
    gate/up masks its input and runs the dense product."""

    def __init__(self, ffn: nn.Module, gate_up: float, down: float,
                 observers: tuple[Observer, Observer] | None = None, gathered: bool = False) -> None:
        super().__init__()
        self.ffn, self.gate_up_threshold, self.down_threshold = ffn, gate_up, down
        self.counts = [0.0, 0.0, 0.0, 0.0]  # kept / seen of gate_up, then of down
        self.observers, self.gathered = observers, gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._count(self.ffn.activations(self._count(x, self.gate_up_threshold, 0)), self.down_threshold, 2)
        if not (self.gathered and self.down_threshold > 0):
            return self.ffn.project_down(h)
        h2 = h.reshape(-1, h.shape[-1])
        idx = (h2 != 0).any(0).nonzero().squeeze(1)
        y = gathered_down(h2.index_select(1, idx), self.ffn.down_t, idx)
        y = y if self.ffn.down_bias is None else y + self.ffn.down_bias.float()
        return y.view(*h.shape[:-1], -1).to(h.dtype)

    def _count(self, x: torch.Tensor, threshold: float, at: int) -> torch.Tensor:
        if self.observers is not None:
            self.observers[at // 2](x.reshape(-1, x.shape[-1]))
        self.counts[at] += float((x.abs() > threshold).sum())
        self.counts[at + 1] += x.numel()
        return mask(x, threshold)


def site_matrices(block) -> dict[str, object]:
    """A block's matrix [out, in] behind each site (a float FFN's down as a view of its down_t)."""
    from hotcold.engine.layers import DenseFFN, QuantFFN

    attn, ffn = block.attn, block.ffn
    out = {"qkv": attn.wqkv, "o": attn.wo}
    if isinstance(ffn, QuantFFN) and ffn.down is not None:
        out.update(gate_up=ffn.gate_up, down=ffn.down)
    elif isinstance(ffn, DenseFFN):
        out.update(gate_up=ffn.gate_up.reshape(-1, ffn.gate_up.shape[-1]), down=ffn.down_t.T)
    return out


def _input_major_layout(weight) -> InputMajor | FloatInputMajor | None:
    """The weight stored input-major for the sparse kernels, or None where they do not take it."""
    if input_sparse.supported(weight):
        return input_sparse.to_input_major(weight)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return FloatInputMajor(weight.T.contiguous())
    return None


def input_major(weight, threshold: float) -> SparseInput | None:
    """The weight as the sparse kernels run it, or None where they do not take it."""
    stored = _input_major_layout(weight)
    return None if stored is None else SparseInput(stored, threshold)


def dense_ffn_sites(model: nn.Module, thresholds: list[dict[str, float]]) -> list[dict[str, float]]:
    """The thresholds without FFN sites where a layer's FFN is not dense (runs a neuron plan): a plan that
    holds both applies input sparsity to the FFNs the neuron plan left dense on this machine."""
    return [t if "gate_up" in site_matrices(block) else {s: v for s, v in t.items() if s in ("qkv", "o")}
            for block, t in zip(model.layers, thresholds)]


def _wrap(weight, threshold: float, input_major: bool, observer: Observer | None):
    if threshold <= 0 and observer is None:
        return weight
    stored = _input_major_layout(weight) if input_major and threshold > 0 else None
    return SparseInput(weight if stored is None else stored, max(float(threshold), 0.0), observer=observer)


def apply_input_sparsity(model: nn.Module, thresholds: list[dict[str, float]], prefill: bool = False,
                         input_major: bool = True, layers: list[int] | None = None,
                         observe: Callable[[int, str, torch.Tensor], None] | None = None) -> list[tuple]:
    """Give each block's projections their input thresholds (per layer: site -> threshold; missing or 0:
    dense). input_major: store quantized matrices input-major for the sparse kernel (one copy, lossless);
    False keeps them as they are and masks (the profiler's reference). `layers`: only these blocks (the
    thresholds still one entry per layer). `observe(layer, site, x)` sees every site's inputs. Returns what
    `restore` needs."""
    from hotcold.engine.layers import DenseFFN, QuantFFN

    blocks = list(model.layers)
    if len(thresholds) != len(blocks):
        raise HotcoldError(f"the plan has {len(thresholds)} layers, the model {len(blocks)}")
    saved = []
    for i in range(len(blocks)) if layers is None else layers:
        block, t = blocks[i], thresholds[i]
        unknown = set(t) - set(SITES)
        if unknown:
            raise HotcoldError(f"unknown input-sparsity sites {sorted(unknown)} (known: {', '.join(SITES)})")
        see = {site: None if observe is None else (lambda x, i=i, site=site: observe(i, site, x)) for site in SITES}
        attn, ffn = block.attn, block.ffn
        saved.append((block, attn.wqkv, attn.wo, ffn, getattr(ffn, "gate_up", None), getattr(ffn, "down", None)))
        attn.wqkv = _wrap(attn.wqkv, t.get("qkv", 0.0), input_major, see["qkv"])
        attn.wo = _wrap(attn.wo, t.get("o", 0.0), input_major, see["o"])
        ffn_sparse = t.get("gate_up", 0.0) > 0 or t.get("down", 0.0) > 0
        if isinstance(ffn, QuantFFN) and ffn.down is not None:
            ffn.gate_up = _wrap(ffn.gate_up, t.get("gate_up", 0.0), input_major, see["gate_up"])
            ffn.down = _wrap(ffn.down, t.get("down", 0.0), input_major, see["down"])
        elif isinstance(ffn, DenseFFN):
            if ffn_sparse or observe is not None:
                block.ffn = InputMaskedFFN(ffn, t.get("gate_up", 0.0), t.get("down", 0.0),
                                           None if observe is None else (see["gate_up"], see["down"]), input_major)
        elif ffn_sparse:  # (observe: a FFN running a neuron plan has no input sites to observe)
            raise HotcoldError(f"input sparsity of the FFN needs a dense FFN; this model's is {type(ffn).__name__}")
    model.input_sparse_prefill = prefill
    return saved


def describe(thresholds: list[dict[str, float]], prefill: bool) -> str:
    """One line for the start-up log: how many sites run sparse, for which tokens."""
    sparse = sum(1 for t in thresholds for v in t.values() if v > 0)
    return (f"input sparsity: {sparse} of {len(SITES) * len(thresholds)} projection sites sparse "
            f"({'prompt and decode tokens' if prefill else 'decode tokens; prompts dense'})")


def restore(model: nn.Module, saved: list[tuple]) -> None:
    """Put back the weights and FFNs apply_input_sparsity replaced (its row-major originals)."""
    for block, wqkv, wo, ffn, gate_up, down in saved:
        block.attn.wqkv, block.attn.wo, block.ffn = wqkv, wo, ffn
        if gate_up is not None:
            ffn.gate_up, ffn.down = gate_up, down
    model.input_sparse_prefill = True  # (no input-major matrix left: which tokens are sparse no longer matters)


def site_sparsity(model: nn.Module) -> list[dict[str, float]]:
    """Per layer, the fraction of each site's inputs dropped on the per-op path since the sparsity was applied."""
    out = []
    for block in model.layers:
        counts, ffn = {}, block.ffn
        for site, w in (("qkv", block.attn.wqkv), ("o", block.attn.wo), ("gate_up", getattr(ffn, "gate_up", None)),
                        ("down", getattr(ffn, "down", None))):
            if isinstance(w, SparseInput) and w.seen:
                counts[site] = 1.0 - w.kept / w.seen
        if isinstance(ffn, InputMaskedFFN):
            c = ffn.counts
            for site, (k, n) in (("gate_up", c[0:2]), ("down", c[2:4])):
                if n:
                    counts[site] = 1.0 - k / n
        out.append(counts)
    return out
