"""`hotcold plan import`: a plan from predictors that come with a model, without profiling.

Three sources: the model folder itself (TurboSparse-Mistral / Bamboo ship `model.layers.N.mlp.predictor.fc1.weight`
[r, H] and `fc2.weight` [I, r] in the checkpoint), a PowerInfer predictor folder (`model_{i}.pt` state
dicts with `fc1.weight` / `fc2.weight`, an optional `config.json` with `sparse_threshold`, optional
`activation/activation_{i}.pt` activation counts), or a PowerInfer GGUF (`blk.N.fc1` / `fc2` tensors,
`powerinfer.sparse_threshold`). PowerInfer's semantics are kept as they are
(llama.cpp `llm_build_ffn_sparse`: idx = pre_w2 @ relu(pre_w1 @ ffn_inp), a row is skipped when
idx < sparse_threshold): no biases, rule "logit", input "residual". Placement is hotcold's own optimizer;
recall and sparsity are measured against the true activations on a few calibration tokens.
"""

from __future__ import annotations

import json
import math
import numbers
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hotcold.engine.errors import HotcoldError
from hotcold.engine.plan import LayerPlan, Plan, PredictorPlan
from hotcold.engine.sparsity import LowRankPredictor

_EMBEDDED = re.compile(r"^model\.layers\.(\d+)\.mlp\.predictor\.fc([12])\.weight$")
_PART = re.compile(r"^model_(\d+)\.pt$")
_ACTIVATION = re.compile(r"^activation_(\d+)\.pt$")


@dataclass
class ImportedPredictors:
    """Per layer (by integer index) w1 [r, H] and w2 [I, r], the threshold, and optional activation counts."""

    weights: dict[int, dict[str, Tensor]]
    threshold: float
    source: str  # "embedded" or "powerinfer"
    counts: dict[int, Tensor]


def read_predictors(src: str | Path, threshold: float | None = None) -> ImportedPredictors:
    """Predictors of a model folder (embedded tensors) or a PowerInfer predictor folder, layers by number."""
    root = Path(src)
    if threshold is not None:
        threshold = _threshold(threshold, "--sparse-threshold")
    if root.is_file() and root.suffix == ".gguf":
        return _gguf_predictors(root, threshold)
    if not root.is_dir():
        raise HotcoldError(f"{root} is not a folder or a .gguf file (give the model folder, a PowerInfer "
                           "predictor folder or a PowerInfer GGUF)")
    parts = {int(m.group(1)): p for p in root.iterdir() if (m := _PART.match(p.name))}
    weights: dict[int, dict[str, Tensor]] = {}
    if parts:
        kind = "powerinfer"
        for i in sorted(parts):  # integers: model_2 before model_10 (PowerInfer issue #247)
            sd = _load_pt(parts[i])
            w = {f"w{k}": sd.get(f"fc{k}.weight") for k in (1, 2)} if isinstance(sd, dict) else {}
            if not w or not all(isinstance(t, Tensor) and t.dim() == 2 for t in w.values()):
                raise HotcoldError(f"{parts[i]} has no fc1.weight / fc2.weight matrices")
            weights[i] = {k: t.float() for k, t in w.items()}
    else:
        from safetensors import safe_open

        kind = "embedded"
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if m := _EMBEDDED.match(key):
                        weights.setdefault(int(m.group(1)), {})[f"w{m.group(2)}"] = st.get_tensor(key).float()
    if not weights:
        raise HotcoldError(f"{root} holds no predictors (neither model.layers.N.mlp.predictor.fc1/fc2 tensors "
                           "nor PowerInfer model_{i}.pt files)")
    for i, w in weights.items():
        if set(w) != {"w1", "w2"} or w["w1"].shape[0] != w["w2"].shape[1]:
            raise HotcoldError(f"layer {i}: predictor needs fc1 [r, H] and fc2 [I, r], got "
                               f"{ {k: tuple(v.shape) for k, v in w.items()} }")
        if not all(bool(torch.isfinite(t).all()) for t in w.values()):
            raise HotcoldError(f"layer {i}: the predictor's weights hold NaN or infinite values")
    conf = root / "config.json"
    if threshold is None and conf.is_file():
        try:
            doc = json.loads(conf.read_text())
        except ValueError as exc:
            raise HotcoldError(f"{conf} is not valid JSON: {exc}") from None
        value = doc.get("sparse_threshold") if isinstance(doc, dict) else None
        threshold = 0.0 if value is None else _threshold(value, f"{conf}: sparse_threshold")
    counts: dict[int, Tensor] = {}
    act = root / "activation"
    if act.is_dir():
        for p in act.iterdir():
            if m := _ACTIVATION.match(p.name):
                c = _load_pt(p)
                if not isinstance(c, Tensor) or not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
                    raise HotcoldError(f"{p} is not a tensor of activation counts")
                counts[int(m.group(1))] = c.flatten().double()
    if counts and sorted(counts) != sorted(weights):
        raise HotcoldError(f"{act} has activation counts for layers {sorted(counts)}, the predictors cover "
                           f"{sorted(weights)}: all layers or none")
    return ImportedPredictors(weights, 0.0 if threshold is None else threshold, kind, counts)


def _load_pt(path: Path) -> object:
    """A PyTorch file's tensors, read with weights_only=True: a pickle of anything else is refused in one line
    (torch's advice to turn weights_only off would let the file run code; its warnings are not shown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HotcoldError(f"{path} is not a plain tensor file (refused: loading it could run code)") from None
    except Exception as exc:  # garbage raises what torch meets first: EOFError, RuntimeError, KeyError, ...
        why = str(exc).splitlines()[0] if str(exc) else "empty or truncated"
        raise HotcoldError(f"{path} is not a readable PyTorch file ({type(exc).__name__}: {why})") from None


def _threshold(value: object, where: str) -> float:
    """A sparse threshold: a finite number (NaN would write a plan whose rule "logit >= nan" passes nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise HotcoldError(f"{where} is {value!r}, expected a finite number")
    return float(value)


def _gguf_predictors(path: Path, threshold: float | None) -> ImportedPredictors:
    """A PowerInfer GGUF's predictors: `blk.N.fc1.weight` [r, H] and `blk.N.fc2.weight` [I, r] (f16), and its
    `powerinfer.sparse_threshold`."""
    from hotcold.engine.gguf_weights import GGUFReader

    reader = GGUFReader(path)
    weights: dict[int, dict[str, Tensor]] = {}
    while reader.has(f"layers.{len(weights)}.fc1.weight"):
        i = len(weights)
        weights[i] = {"w1": reader.get(f"layers.{i}.fc1.weight"), "w2": reader.get(f"layers.{i}.fc2.weight")}
        if weights[i]["w2"] is None or weights[i]["w1"].shape[0] != weights[i]["w2"].shape[1]:
            raise HotcoldError(f"{path}: layer {i}'s predictor needs fc1 [r, H] and fc2 [I, r]")
    if not weights:
        raise HotcoldError(f"{path} holds no predictors (no blk.N.fc1.weight / fc2.weight tensors)")
    if threshold is None:
        threshold = _threshold(reader.metadata.get("powerinfer.sparse_threshold", 0.0),
                               f"{path}: powerinfer.sparse_threshold")
    return ImportedPredictors(weights, threshold, "powerinfer", {})


class _Recorder(nn.Module):
    """Stands in for a layer's FFN while calibrating: keeps the pre-norm residual and the true activations."""

    wants_residual = True

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn, self.residual, self.active = ffn, [], []
        self.norm = ffn.down_t.detach().float().norm(dim=1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        self.residual.append(residual.reshape(-1, x.shape[-1]).float())
        self.active.append(self.ffn.activations(x2).float().abs() * self.norm > 0)  # threshold 0: the plan's
        return self.ffn(x)


@torch.no_grad()
def calibrate(model: nn.Module, sequences: list[list[int]]) -> list[tuple[Tensor, Tensor]]:
    """Per layer (pre-norm residual [N, H], true active mask [N, I]) over the sequences."""
    blocks = list(model.layers)
    originals = [b.ffn for b in blocks]
    recorders = [_Recorder(f) for f in originals]
    try:
        for b, r in zip(blocks, recorders, strict=True):
            b.ffn = r
        for s in sequences:
            model.forward_sequence(torch.tensor(s))
    finally:
        for b, f in zip(blocks, originals, strict=True):
            b.ffn = f
    return [(torch.cat(r.residual), torch.cat(r.active)) for r in recorders]


def _quality(pred: Tensor, true: Tensor) -> tuple[float, float]:
    """(recall of the truly active neurons, fraction predicted inactive)."""
    hits, actual = float((pred & true).sum()), float(true.sum())
    return (1.0 if actual == 0 else hits / actual), 1.0 - float(pred.float().mean())


def build_import_plan(loaded, imported: ImportedPredictors, sequences: list[list[int]], gpu_memory: int | None,
                      gpu_dtype_bytes: int = 2, context: int = 1024, batch: int = 1) -> Plan:
    """The plan: imported predictors with their measured quality, hot neurons by hotcold's placement."""
    from hotcold.engine import placement
    from hotcold.profiler.pipeline import check_budget

    model, mcfg = loaded.model, loaded.config
    if mcfg.num_experts:
        raise HotcoldError("mixture-of-experts models are not supported: plans cover dense FFNs only")
    L, H, I = len(model.layers), mcfg.hidden_size, model.layers[0].ffn.down_t.shape[0]
    if sorted(imported.weights) != list(range(L)):
        raise HotcoldError(f"the predictors cover layers {sorted(imported.weights)}, the model has 0..{L - 1}")
    for i, w in imported.weights.items():
        if w["w1"].shape[1] != H or w["w2"].shape[0] != I:
            raise HotcoldError(f"layer {i}: predictor shapes {tuple(w['w1'].shape)}, {tuple(w['w2'].shape)} do "
                               f"not fit hidden {H} / intermediate {I}")
        if i in imported.counts and imported.counts[i].numel() != I:
            raise HotcoldError(f"layer {i}: {imported.counts[i].numel()} activation counts, the model has {I} "
                               "neurons per layer")
    pred_params = sum(LowRankPredictor.num_params(H, w["w1"].shape[0], I) - w["w1"].shape[0] - I
                      for w in imported.weights.values())
    check_budget(model, gpu_memory, gpu_dtype_bytes, pred_params, context, batch)  # before calibrating
    data = calibrate(model, sequences)
    n_tokens = int(data[0][0].shape[0])
    preds, freqs, quality = [], [], []
    for i in range(L):
        p = LowRankPredictor.from_weights(imported.weights[i], rule="logit", input="residual")
        residual, true = data[i]
        mask = p.predict(residual, tau=imported.threshold)
        k = int(round(float(mask.sum(1).float().mean())))
        kmask = p.predict(residual, top_k=k)
        quality.append((*_quality(mask, true), *_quality(kmask, true), 1.0 - float(true.float().mean())))
        freqs.append(imported.counts[i].float() if i in imported.counts else mask.float().mean(0))
        preds.append((p, k))
    budget = placement.place_for_budget(model, freqs, gpu_memory, gpu_dtype_bytes, pred_params, context, batch)
    place, reserved, nbytes = budget.placement, budget.reserved, budget.neuron_bytes
    layers = []
    for i, ((p, k), (rec, sp, krec, ksp, true_sp)) in enumerate(zip(preds, quality, strict=True)):
        pp = PredictorPlan(rank=p.rank, tau=imported.threshold, top_k=k, recall=rec, sparsity=sp, topk_recall=krec,
                           topk_sparsity=ksp, weights=p.export(), rule="logit", input="residual",
                           source=imported.source)
        layers.append(LayerPlan(index=i, threshold=0.0, cett=0.0, sparsity=true_sp, num_neurons=I,
                                hot_ids=place.hot_ids[i], frequency=freqs[i].float(), predictor=pp))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Plan(
        fingerprint=loaded.fingerprint, layers=layers,
        model={"source": loaded.source, "arch": mcfg.arch, "activation": mcfg.activation, "num_layers": L,
               "hidden_size": H, "intermediate_size": I, "dtype": str(model.dtype).removeprefix("torch.")},
        corpus={"description": "calibration slice for measuring imported predictors", "calibration_tokens": n_tokens},
        targets={"imported": imported.source, "sparse_threshold": imported.threshold},
        placement={"gpu_memory_bytes": gpu_memory, "gpu_dtype_bytes": gpu_dtype_bytes, "context": context,
                   "batch": batch, "reserved_bytes": reserved, "neuron_bytes": nbytes,
                   "hot_neurons": sum(place.hot_counts), "total_neurons": L * I, "hot_bytes": place.hot_bytes,
                   "cold_bytes": place.cold_bytes, "served_share": place.served / place.total if place.total else 0.0,
                   "frequency_source": "powerinfer activation counts" if imported.counts else
                   "predicted activation frequency on the calibration tokens"},
        stats={"predictor_recall": mean([q[0] for q in quality]), "predictor_sparsity": mean([q[1] for q in quality]),
               "true_sparsity": mean([q[4] for q in quality])},
    )
