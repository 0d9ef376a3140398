"""The plan: the one contract between the profiler (writer) and the engine / hybrid executor (readers).

A plan folder holds
- `plan.json`: a versioned description (schema below: `Plan` and its `LayerPlan`s, serialised as dicts);
- `hot_neurons.safetensors`: per layer `layers.{i}.hot_ids` (int64, the GPU neurons, most frequent first)
  and `layers.{i}.frequency` (float32 [I], how often each neuron was active on the calibration corpus);
- `predictors.safetensors` (when predictors were trained): per layer `layers.{i}.predictor.{w1,b1,w2,b2}`,
  a low-rank MLP  logits = w2 @ relu(w1 @ x + b1) + b2  (w1 [r, H], b1 [r], w2 [I, r], b2 [I]); an imported
  PowerInfer predictor has no b1/b2 (zero biases).

Conventions: neuron i of layer l is *active* on a token iff |h_i| * ||down_t[i]||_2 > threshold_l, where
h = ffn.activations(x) (so threshold 0 keeps every non-zero neuron). A predictor says neuron i is active
iff sigmoid(logit_i) >= tau_l (predictor rule "sigmoid", hotcold's) or logit_i >= tau_l (rule "logit",
PowerInfer's sparse_threshold), or, with the top-k strategy, iff it is among the top_k_l logits. x is the
FFN's normed input (predictor input "ffn_norm") or the residual stream before the FFN norm ("residual",
PowerInfer's ffn_inp). Plans without rule/input fields read as sigmoid / ffn_norm.
An input-sparsity plan (`targets["sparsity"] == "input"`) gives each layer `inputs`: thresholds on the
inputs of its projections (engine.input_sparsity); its layers have no hot neurons and no predictors.
Layers are always keyed and listed by their integer index, never by a string sort.

This module imports nothing from the profiler: the engine reads plans through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hotcold.engine.errors import HotcoldError

PLAN_FORMAT = "hotcold-plan"
PLAN_VERSION = 1
PLAN_JSON = "plan.json"
HOT_FILE = "hot_neurons.safetensors"
PREDICTOR_FILE = "predictors.safetensors"
_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def compute_fingerprint(config: Mapping[str, Any], tensors: Mapping[str, tuple[Any, Any]]) -> str:
    """16 hex digits of sha256 over the model's config and its tensors' names, shapes and dtypes (as stored
    in the checkpoint, not the runtime dtype), in a canonical order: two models share a fingerprint iff
    they share all three. The loader's `LoadedModel.fingerprint` is this function of
    (config without its bos/eos ids, checkpoint tensors). `config` values must be JSON-serialisable."""
    canon = sorted((str(name), [int(d) for d in shape], _dtype_name(dtype)) for name, (shape, dtype) in tensors.items())
    blob = json.dumps({"config": dict(config), "tensors": canon}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class PredictorPlan:
    """One layer's activation predictor: its size, decision rules and held-out quality."""

    rank: int
    tau: float  # probability threshold of the threshold strategy
    top_k: int  # number of neurons of the top-k strategy
    recall: float  # held-out recall of active neurons, threshold strategy
    sparsity: float  # held-out fraction of neurons predicted inactive, threshold strategy
    topk_recall: float
    topk_sparsity: float
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # w1, b1, w2, b2 (no b*: none)
    rule: str = "sigmoid"  # "sigmoid": sigmoid(logit) >= tau; "logit": logit >= tau (PowerInfer)
    input: str = "ffn_norm"  # "ffn_norm": the normed FFN input; "residual": the residual before the norm
    source: str = "trained"  # "trained" by hotcold profile, or where an imported predictor came from


@dataclass
class InputPlan:
    """One layer's input sparsity (TEAL, engine.input_sparsity): per site (qkv, o, gate_up, down), the
    threshold on |input| (0: the site stays dense) and the held-out fraction of its inputs dropped."""

    thresholds: dict[str, float]
    sparsity: dict[str, float] = field(default_factory=dict)


@dataclass
class LayerPlan:
    """One layer: its threshold, measured sparsity, GPU (hot) neurons and optional predictor; or, in an
    input-sparsity plan, its `inputs` (no neuron sparsity: threshold 0, no hot neurons, no predictor)."""

    index: int
    threshold: float  # magnitude threshold (see module doc); 0 = drop only exact zeros
    cett: float  # the CETT target this threshold was chosen for
    sparsity: float  # fraction of inactive neurons on the calibration corpus at this threshold
    num_neurons: int  # intermediate size of the layer
    hot_ids: torch.Tensor = field(repr=False)  # int64 [hot_count], most frequently active first
    frequency: torch.Tensor = field(repr=False)  # float32 [num_neurons]
    predictor: PredictorPlan | None = None
    inputs: InputPlan | None = None

    @property
    def hot_count(self) -> int:
        return int(self.hot_ids.numel())


@dataclass
class Plan:
    """A whole plan. `model`, `corpus`, `targets`, `placement`, `perplexity` and `stats` are free-form JSON
    dicts for people and reports; what an executor needs is typed: fingerprint, layers."""

    fingerprint: str
    layers: list[LayerPlan]
    model: dict[str, Any] = field(default_factory=dict)  # arch, num_layers, hidden/intermediate size, ...
    corpus: dict[str, Any] = field(default_factory=dict)  # description, tokens used for each part
    targets: dict[str, Any] = field(default_factory=dict)  # cett / max_ppl_increase / recall target / seed
    placement: dict[str, Any] = field(default_factory=dict)  # bytes on each side, budget, reserved parts
    perplexity: dict[str, Any] = field(default_factory=dict)  # dense / oracle / predictor on held-out text
    stats: dict[str, Any] = field(default_factory=dict)  # per-layer statistics for reports
    version: int = PLAN_VERSION

    def layer(self, index: int) -> LayerPlan:
        return self.layers[index]

    @property
    def sparsity_mode(self) -> str:
        """How the plan is meant to run: "input" (input thresholds only) or "predictor" (neuron predictors, with
        input thresholds beside them where it has them)."""
        only_inputs = all(lp.inputs is not None and lp.predictor is None for lp in self.layers)
        return "input" if self.layers and only_inputs else "predictor"

    def check_model(self, fingerprint: str, where: str = "") -> None:
        """Refuse a plan made for another model (HotcoldError, never a silent misuse)."""
        if fingerprint != self.fingerprint:
            made_for = self.model.get("source") or self.model.get("arch") or "another model"
            name = f"plan {where}" if where else "this plan"
            raise HotcoldError(
                f"{name} was made for a different model ({made_for}, fingerprint {self.fingerprint[:12]}) "
                f"than the one loaded (fingerprint {fingerprint[:12]}); run `hotcold profile` for this model")


def save_plan(plan: Plan, out_dir: str | Path) -> Path:
    """Write plan.json and its safetensors files into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = sorted(plan.layers, key=lambda lp: lp.index)
    if [lp.index for lp in layers] != list(range(len(layers))):
        raise ValueError(f"plan layers must be 0..{len(layers) - 1}, got {[lp.index for lp in layers]}")
    hot: dict[str, torch.Tensor] = {}
    preds: dict[str, torch.Tensor] = {}
    layer_dicts = []
    for lp in layers:
        hot[f"layers.{lp.index}.hot_ids"] = lp.hot_ids.to(torch.int64).contiguous()
        hot[f"layers.{lp.index}.frequency"] = lp.frequency.to(torch.float32).contiguous()
        d = {k: v for k, v in dataclasses.asdict(_shallow(lp)).items() if k not in ("hot_ids", "frequency")}
        d["hot_count"] = lp.hot_count
        if lp.inputs is not None:
            d["inputs"] = dataclasses.asdict(lp.inputs)
        if lp.predictor is not None:
            d["predictor"] = {k: v for k, v in dataclasses.asdict(_shallow(lp.predictor)).items()
                              if k != "weights"}
            for name, t in lp.predictor.weights.items():
                preds[f"layers.{lp.index}.predictor.{name}"] = t.to(torch.float32).contiguous()
        layer_dicts.append(d)
    doc = {
        "format": PLAN_FORMAT, "version": plan.version, "fingerprint": plan.fingerprint, "model": plan.model,
        "corpus": plan.corpus, "targets": plan.targets, "placement": plan.placement,
        "perplexity": plan.perplexity, "layers": layer_dicts, "stats": plan.stats,
    }
    save_file(hot, str(out / HOT_FILE))
    if preds:
        save_file(preds, str(out / PREDICTOR_FILE))
    elif (out / PREDICTOR_FILE).exists():
        (out / PREDICTOR_FILE).unlink()
    (out / PLAN_JSON).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    return out


def load_plan(plan_dir: str | Path, fingerprint: str | None = None) -> Plan:
    """Read a plan folder; with `fingerprint`, refuse a plan made for another model."""
    root = Path(plan_dir)
    meta = root / PLAN_JSON
    if not meta.is_file():
        raise HotcoldError(f"{root} is not a plan folder (no {PLAN_JSON}); create one with `hotcold profile`")
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HotcoldError(f"{meta} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise HotcoldError(f"{meta} is not a hotcold plan")
    if doc.get("version") != PLAN_VERSION:
        raise HotcoldError(f"{meta} has plan version {doc.get('version')}, this hotcold reads version "
                           f"{PLAN_VERSION}; profile the model again")
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        Plan(fingerprint=str(doc.get("fingerprint")), layers=[], model=doc.get("model") or {}).check_model(
            fingerprint, str(root))
    try:
        hot = _by_layer(load_file(str(root / HOT_FILE)))
        preds = _by_layer(load_file(str(root / PREDICTOR_FILE))) if (root / PREDICTOR_FILE).exists() else {}
        layers = [_layer_from(d, hot, preds) for d in sorted(doc["layers"], key=lambda d: int(d["index"]))]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise HotcoldError(f"plan {root} is incomplete or damaged: {type(exc).__name__}: {exc}") from None
    if [lp.index for lp in layers] != list(range(len(layers))):
        found = [lp.index for lp in layers]
        raise HotcoldError(f"plan {root} has layers {found}, expected 0..{len(layers) - 1}")
    return Plan(fingerprint=doc["fingerprint"], layers=layers, model=doc.get("model", {}),
                corpus=doc.get("corpus", {}), targets=doc.get("targets", {}),
                placement=doc.get("placement", {}), perplexity=doc.get("perplexity", {}),
                stats=doc.get("stats", {}), version=doc["version"])


def _by_layer(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Group `layers.{i}.{name}` tensors by integer layer index (never by the key's string order)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected tensor {key!r}")
        out.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return out


def _layer_from(d: dict[str, Any], hot: dict, preds: dict) -> LayerPlan:
    i = int(d["index"])
    t = hot[i]
    pred = None
    if d.get("predictor") is not None:
        p = dict(d["predictor"])
        w = {k.removeprefix("predictor."): v for k, v in preds[i].items()}
        pred = PredictorPlan(rank=int(p["rank"]), tau=float(p["tau"]), top_k=int(p["top_k"]),
                             recall=float(p["recall"]), sparsity=float(p["sparsity"]),
                             topk_recall=float(p["topk_recall"]), topk_sparsity=float(p["topk_sparsity"]),
                             weights=w, rule=str(p.get("rule", "sigmoid")), input=str(p.get("input", "ffn_norm")),
                             source=str(p.get("source", "trained")))
        if pred.rule not in ("sigmoid", "logit") or pred.input not in ("ffn_norm", "residual"):
            raise ValueError(f"layer {i}: unknown predictor rule {pred.rule!r} or input {pred.input!r}")
    inputs = None
    if d.get("inputs") is not None:
        inputs = InputPlan({str(k): float(v) for k, v in d["inputs"]["thresholds"].items()},
                           {str(k): float(v) for k, v in d["inputs"].get("sparsity", {}).items()})
    lp = LayerPlan(index=i, threshold=float(d["threshold"]), cett=float(d["cett"]),
                   sparsity=float(d["sparsity"]), num_neurons=int(d["num_neurons"]),
                   hot_ids=t["hot_ids"].to(torch.int64), frequency=t["frequency"], predictor=pred, inputs=inputs)
    if lp.hot_count != int(d.get("hot_count", lp.hot_count)):
        raise ValueError(f"layer {i}: hot_count {d['hot_count']} != {lp.hot_count} stored ids")
    return lp


def _shallow(obj: Any) -> Any:
    """A copy without tensors so dataclasses.asdict does not deep-copy weights."""
    skip = {"hot_ids", "frequency", "weights", "predictor", "inputs"}
    kwargs = {f.name: (None if f.name in skip else getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if "predictor" in kwargs:
        kwargs["predictor"] = None
    if "inputs" in kwargs:
        kwargs["inputs"] = None
    if "weights" in kwargs:
        kwargs["weights"] = {}
    return type(obj)(**kwargs)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
