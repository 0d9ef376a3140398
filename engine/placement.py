"""Hot/cold placement: which FFN neurons live on the GPU, given its memory budget. The profiler places a
plan's neurons with it, and `--gpu-memory` at serve/generate time re-places them from the plan's measured
frequencies (no re-profiling), so it lives with the engine.

The value of a neuron is its expected number of activations per token (its activation frequency); the
cost is the bytes of its rows (gate, up, down, biases). Every neuron of one layer costs the same, so:
- within a layer the optimum takes neurons by descending frequency (any other choice of the same count
  serves fewer activations);
- when all layers cost the same per neuron (every uniform transformer), taking the globally most frequent
  neurons is exactly optimal — the knapsack has equal weights;
- with different per-layer costs the greedy order by frequency per byte is optimal for the fractional
  relaxation and within one neuron's value of the integer optimum; it also keeps filling the remainder
  with any neuron that still fits.
A per-layer minimum (PowerInfer's communication constraint: a layer with a GPU part should have enough
neurons there to pay for the transfer) is reserved first; the rest is greedy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hotcold.engine.errors import HotcoldError
from hotcold.engine.layers import QuantFFN
from hotcold.engine.plan import Plan
from hotcold.kernels import qrows
from hotcold.kernels.quant import QuantTensor

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def parse_memory(text: str) -> int | None:
    """'8GiB' -> 8589934592, '512MB', '0' -> 0; 'all' / 'inf' -> None (no limit)."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("all", "inf", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise HotcoldError(f"cannot read the memory size {text!r} (examples: 8GiB, 512MiB, 24GB, 0, all)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def neuron_bytes(hidden: int, gated: bool, bias: bool, dtype_bytes: int) -> int:
    """Bytes one FFN neuron occupies: its up (and gate) row, its down column, its biases."""
    rows = 3 if gated else 2
    return (rows * hidden + (2 if gated and bias else 1 if bias else 0)) * dtype_bytes


def model_neuron_bytes(model: nn.Module, dtype_bytes: int) -> int:
    """GPU bytes of one of this model's FFN neurons: 16/32-bit rows, or for an FFN kept in GGUF blocks the
    quantized rows the GPU side holds (engine/quant_hybrid.py: gate/up in the checkpoint's type, down as
    Q8_0, fp32 biases) — what lets a card hold most hot neurons of a larger model."""
    cfg = model.config
    ffn = model.layers[0].ffn
    if not isinstance(ffn, QuantFFN):
        return neuron_bytes(cfg.hidden_size, cfg.gated, bool(getattr(cfg, "mlp_bias", False)), dtype_bytes)
    parts = 2 if ffn.gated else 1
    bias = 0 if ffn.gate_up_bias is None else 4 * parts
    return parts * qrows.row_bytes(ffn.gate_up.qtype, cfg.hidden_size) + qrows.row_bytes("Q8_0", cfg.hidden_size) \
        + bias


@dataclass
class Placement:
    """Hot neuron ids per layer (most frequent first) and the bytes on each side."""

    hot_ids: list[Tensor]
    hot_bytes: int
    cold_bytes: int
    served: float  # expected activations per token served by hot neurons
    total: float  # expected activations per token overall

    @property
    def hot_counts(self) -> list[int]:
        return [int(t.numel()) for t in self.hot_ids]


def place_neurons(frequencies: list[Tensor], costs: list[int], budget: int | None,
                  min_per_layer: int | list[int] = 0) -> Placement:
    """Choose hot neurons maximising expected GPU activations within `budget` bytes (None: everything).
    Raises HotcoldError when the per-layer minimums alone do not fit."""
    L = len(frequencies)
    mins = [min_per_layer] * L if isinstance(min_per_layer, int) else list(min_per_layer)
    orders = [torch.sort(f.double(), descending=True, stable=True) for f in frequencies]
    sizes = [len(f) for f in frequencies]
    total_bytes = sum(n * c for n, c in zip(sizes, costs))
    total = float(sum(f.double().sum() for f in frequencies))
    if budget is None or budget >= total_bytes:
        counts = sizes
    else:
        counts = [min(m, n) for m, n in zip(mins, sizes)]
        left = budget - sum(k * c for k, c in zip(counts, costs))
        if left < 0:
            need = sum(k * c for k, c in zip(counts, costs))
            raise HotcoldError(f"the per-layer minimum needs {fmt_bytes(need)} of GPU memory for FFN neurons, "
                               f"but only {fmt_bytes(budget)} is left after the dense parts")
        # candidates beyond each layer's minimum, by expected activations per byte
        layer_idx = torch.cat([torch.full((n - k,), i, dtype=torch.long) for i, (n, k)
                               in enumerate(zip(sizes, counts))])
        rank_idx = torch.cat([torch.arange(k, n) for n, k in zip(sizes, counts)])
        values = torch.cat([orders[i].values[k:] for i, k in enumerate(counts)])
        cost_t = torch.tensor(costs, dtype=torch.float64)[layer_idx]
        key = values / cost_t
        order = torch.from_numpy(_lexsort_desc(key, layer_idx, rank_idx))
        if len(set(costs)) == 1:  # equal weights: the top items that fit, exactly
            take = order[: max(0, int(left // costs[0]))]
            for i in layer_idx[take].tolist():
                counts[i] += 1
        else:
            for j in order.tolist():
                i = int(layer_idx[j])
                if int(rank_idx[j]) == counts[i] and costs[i] <= left:  # keep per-layer prefixes
                    counts[i] += 1
                    left -= costs[i]
    hot = [orders[i].indices[:k].clone() for i, k in enumerate(counts)]
    hot_bytes = sum(k * c for k, c in zip(counts, costs))
    served = float(sum(orders[i].values[:k].sum() for i, k in enumerate(counts)))
    return Placement(hot, hot_bytes, total_bytes - hot_bytes, served, total)


@dataclass
class BudgetPlacement:
    placement: Placement
    parts: dict[str, int]  # the dense parts' GPU bytes (dense_parts)
    reserved: int  # of those, what the budget holds back (0 for a CPU-only budget)
    neuron_bytes: int


def place_for_budget(model: nn.Module, frequencies: list[Tensor], gpu_memory: int | None, dtype_bytes: int,
                     predictor_params: int, context: int, batch: int, min_per_layer: int = 0) -> BudgetPlacement:
    """The placement for a GPU budget: the dense parts (embeddings,
    attention, head, norms, predictors, KV cache for batch x context) go first, FFN neurons fill the rest by
    frequency. gpu_memory 0: CPU only (nothing reserved); None: everything on the GPU."""
    parts = dense_parts(model, dtype_bytes, predictor_params, context, batch)
    nbytes = model_neuron_bytes(model, dtype_bytes)
    L = len(frequencies)
    if gpu_memory == 0:
        return BudgetPlacement(place_neurons(frequencies, [nbytes] * L, 0, 0), parts, 0, nbytes)
    reserved = sum(parts.values())
    if gpu_memory is not None and reserved > gpu_memory:
        raise HotcoldError(f"a GPU memory budget of {fmt_bytes(gpu_memory)} is smaller than the dense parts need "
                           f"({fmt_bytes(reserved)}: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items())
                           + "); raise it, or lower the context/batch (KV cache), or use 0 for CPU only")
    left = None if gpu_memory is None else gpu_memory - reserved
    return BudgetPlacement(place_neurons(frequencies, [nbytes] * L, left, min_per_layer), parts, reserved, nbytes)


def _lexsort_desc(key: Tensor, layer: Tensor, rank: Tensor):
    import numpy as np

    return np.lexsort((rank.numpy(), layer.numpy(), -key.numpy()))


def dense_parts(model: nn.Module, dtype_bytes: int, predictor_params: int, context: int, batch: int,
                kv_bytes: int | None = None) -> dict[str, int]:
    """GPU bytes of everything that is not an FFN neuron: embeddings, attention, norms, lm_head (counted
    once when tied), predictors (float32) and the KV cache for `batch` sequences of `context` tokens."""
    cfg = model.config
    parts = {"embeddings": 0, "attention": 0, "norms": 0, "lm_head": 0, "other": 0}
    seen: set[int] = set()

    def add(part: str, t: Weight | None) -> None:
        if not isinstance(t, Weight) or id(t) in seen:
            return
        seen.add(id(t))
        parts[part] += gpu_bytes(t, dtype_bytes)

    add("embeddings", getattr(model, "embed", None))
    add("embeddings", getattr(model, "pos_embed", None))
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and id(lm_head) in seen:
        seen.discard(id(lm_head))  # tied: the GPU needs the matrix once, count it under lm_head
        parts["embeddings"] -= gpu_bytes(lm_head, dtype_bytes)
    add("lm_head", lm_head)
    for block in model.layers:
        for t in _tensors(block.attn):
            add("attention", t)
        for norm in (block.attn_norm, block.ffn_norm):
            for t in _tensors(norm):
                add("norms", t)
    for t in _tensors(getattr(model, "final_norm", None)):
        add("norms", t)
    kv = kv_bytes if kv_bytes is not None else dtype_bytes
    parts["kv_cache"] = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * batch * kv
    parts["predictors"] = predictor_params * 4  # float32 wherever they run (engine.sparsity.LowRankPredictor)
    parts.pop("other")
    return parts


Weight = Tensor | QuantTensor | qrows.QRows


def gpu_bytes(t: Weight, dtype_bytes: int) -> int:
    """What a weight costs on a GPU side: float tensors in `dtype_bytes` per element; a quantized matrix as
    the quantized rows it becomes there (engine.hybrid.move_dense_parts), or as floats where its type has no
    such rows."""
    if isinstance(t, qrows.QRows):
        return t.nbytes
    if qrows.supported(t):
        return t.shape[0] * qrows.row_bytes(t.qtype, t.shape[1])
    return math.prod(t.shape) * dtype_bytes


def _tensors(module: nn.Module | None) -> list[Weight]:
    if module is None:
        return []
    return [v for v in vars(module).values() if isinstance(v, Weight)] + \
        list(module.parameters()) + list(module.buffers())


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unlimited"
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.2f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exp]}"


def replan(plan: Plan, model: nn.Module, gpu_memory: int | None, dtype_bytes: int, context: int, batch: int
           ) -> BudgetPlacement:
    """Re-place a plan's hot neurons for another GPU budget, in place, from the frequencies the plan measured
    (PowerInfer's --vram-budget, without re-profiling). The dense parts and the KV cache for batch x context
    tokens are reserved first."""
    freqs = [lp.frequency for lp in plan.layers]
    predictors = sum(sum(w.numel() for w in lp.predictor.weights.values()) for lp in plan.layers
                     if lp.predictor is not None and lp.predictor.weights)
    budget = place_for_budget(model, freqs, gpu_memory, dtype_bytes, predictors, context, batch)
    for lp, ids in zip(plan.layers, budget.placement.hot_ids, strict=True):
        lp.hot_ids = ids
    return budget
