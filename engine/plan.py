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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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


def is_plan_folder(path: str | Path) -> bool:
    """Whether `path` holds a hotcold plan: a plan.json naming the format and a version as save_plan writes
    them (any version). The only non-empty folders a plan writer may replace."""
    try:
        doc = json.loads((Path(path) / PLAN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == PLAN_FORMAT and "version" in doc


def load_plan(plan_dir: str | Path, fingerprint: str | None = None) -> Plan:
    """Read a plan folder and check every field an executor uses (HotcoldError naming the file, the layer and
    the field or tensor); with `fingerprint`, refuse a plan made for another model."""
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
    if doc.get("version") != PLAN_VERSION or type(doc.get("version")) is not int:  # "1" is not version 1
        raise HotcoldError(f"{meta} has plan version {json.dumps(doc.get('version'))}, this hotcold reads version "
                           f"{PLAN_VERSION}; profile the model again")
    if not isinstance(doc.get("fingerprint"), str):
        raise HotcoldError(f"{meta}: fingerprint is {json.dumps(doc.get('fingerprint'))}, expected a string")
    info = {k: doc.get(k, {}) for k in ("model", "corpus", "targets", "placement", "perplexity", "stats")}
    for key, value in info.items():
        if not isinstance(value, dict):
            raise HotcoldError(f"{meta}: {key} is {json.dumps(value)[:40]}, expected an object")
    if info["placement"].get("gpu_memory_bytes") is not None:  # the budget `generate` re-places a plan for
        _int(info["placement"], "gpu_memory_bytes", f"{meta}: placement", 0)
    if fingerprint is not None and doc["fingerprint"] != fingerprint:
        Plan(fingerprint=doc["fingerprint"], layers=[], model=info["model"]).check_model(fingerprint, str(root))
    entries = doc.get("layers")
    if not isinstance(entries, list) or not entries or not all(isinstance(d, dict) for d in entries):
        raise HotcoldError(f"{meta}: layers must be a non-empty list of objects")
    index = [_int(d, "index", f"{meta}: a layer", 0) for d in entries]
    if sorted(index) != list(range(len(index))):
        raise HotcoldError(f"{meta} lists layers {sorted(index)}, expected 0..{len(index) - 1}")
    hot = _read_tensors(root / HOT_FILE, index)
    with_pred = [i for i, d in zip(index, entries) if d.get("predictor") is not None]
    preds = _read_tensors(root / PREDICTOR_FILE, with_pred) if with_pred else {}
    hidden = info["model"].get("hidden_size")
    layers = [_layer_from(d, hot[i], preds.get(i, {}), hidden if isinstance(hidden, int) else None, root)
              for i, d in sorted(zip(index, entries), key=lambda x: x[0])]
    return Plan(fingerprint=doc["fingerprint"], layers=layers, version=doc["version"], **info)


def _read_tensors(path: Path, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """A plan's safetensors file by integer layer, holding exactly `layers` (never by the keys' string order)."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise HotcoldError(f"plan {path.parent} is incomplete or damaged: {path.name} is missing") from None
    except (OSError, SafetensorError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HotcoldError(f"plan {path.parent} is incomplete or damaged: {path.name} cannot be read ({why})") \
            from None
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise HotcoldError(f"{path}: unexpected tensor {key!r} (expected layers.N.NAME)")
        out.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if sorted(out) != sorted(layers):
        raise HotcoldError(f"{path} holds tensors for layers {sorted(out)}, {PLAN_JSON} needs {sorted(layers)}")
    return out


def _int(d: Mapping[str, Any], key: str, where: str, low: int, high: int | None = None) -> int:
    """d[key] as an int in [low, high] (high None: no limit), or one HotcoldError naming where and the field."""
    v = d.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is not int or v < low or (high is not None and v > high):
        raise HotcoldError(f"{where}: {key} is {json.dumps(v)}, expected an integer "
                           + (f">= {low}" if high is None else f"in [{low}, {high}]"))
    return v


def _num(d: Mapping[str, Any], key: str, where: str, low: float = -math.inf, high: float = math.inf,
         finite: bool = True) -> float:
    """d[key] as a float in [low, high] (finite unless finite=False: statistics for reports may be NaN)."""
    v = d.get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok or (finite and not (math.isfinite(v) and low <= v <= high)):
        bounds = "" if not finite or low == -math.inf else f" >= {low:g}" if high == math.inf else \
            f" in [{low:g}, {high:g}]"
        raise HotcoldError(f"{where}: {key} is {json.dumps(v)}, expected a {'finite ' if finite else ''}number{bounds}")
    return float(v)


def _tensor(ts: Mapping[str, torch.Tensor], name: str, shape: tuple[int | None, ...], where: str,
            floating: bool = True) -> torch.Tensor:
    """ts[name]: floating (finite) or integer, of `shape` (None: any size), or HotcoldError naming it."""
    t = ts.get(name)
    if t is None:
        raise HotcoldError(f"{where}.{name} is missing")
    want = "float" if floating else "integer"
    if (t.dtype.is_floating_point != floating or t.dtype == torch.bool or t.dim() != len(shape)
            or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        raise HotcoldError(f"{where}.{name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected "
                           f"{want} [{', '.join('n' if s is None else str(s) for s in shape)}]")
    if floating and not bool(torch.isfinite(t).all()):
        raise HotcoldError(f"{where}.{name} holds NaN or infinite values")
    return t


def _layer_from(d: dict[str, Any], hot: dict, preds: dict, hidden: int | None, root: Path) -> LayerPlan:
    """One layer from its plan.json entry and tensors, checked against the layer's own sizes."""
    i = int(d["index"])
    at, hot_at, pred_at = f"{root / PLAN_JSON}: layer {i}", f"{root / HOT_FILE}: layers.{i}", \
        f"{root / PREDICTOR_FILE}: layers.{i}.predictor"
    I = _int(d, "num_neurons", at, 1)
    hot_ids = _tensor(hot, "hot_ids", (None,), hot_at, floating=False).to(torch.int64)
    if hot_ids.numel() and (int(hot_ids.min()) < 0 or int(hot_ids.max()) >= I):
        raise HotcoldError(f"{hot_at}.hot_ids holds neuron ids outside 0..{I - 1}")
    if hot_ids.unique().numel() != hot_ids.numel():
        raise HotcoldError(f"{hot_at}.hot_ids lists a neuron twice")
    if "hot_count" in d and _int(d, "hot_count", at, 0) != hot_ids.numel():
        raise HotcoldError(f"{at}: hot_count {d['hot_count']} != {hot_ids.numel()} stored ids")
    frequency = _tensor(hot, "frequency", (I,), hot_at)
    pred = None
    if d.get("predictor") is not None:
        p = d["predictor"]
        if not isinstance(p, dict):
            raise HotcoldError(f"{at}: predictor must be an object")
        rule, inp = p.get("rule", "sigmoid"), p.get("input", "ffn_norm")
        if rule not in ("sigmoid", "logit") or inp not in ("ffn_norm", "residual"):
            raise HotcoldError(f"{at}: unknown predictor rule {rule!r} or input {inp!r}")
        r = _int(p, "rank", f"{at} predictor", 1)
        w = {k.removeprefix("predictor."): v for k, v in preds.items()}
        if set(w) - {"w1", "b1", "w2", "b2"} or ("b1" in w) != ("b2" in w):
            raise HotcoldError(f"{pred_at}: expected w1, w2 (and b1 with b2), found {sorted(w)}")
        w = {"w1": _tensor(w, "w1", (r, hidden), pred_at), "w2": _tensor(w, "w2", (I, r), pred_at)} | (
            {"b1": _tensor(w, "b1", (r,), pred_at), "b2": _tensor(w, "b2", (I,), pred_at)} if "b1" in w else {})
        stat = lambda key: _num(p, key, f"{at} predictor", finite=False)  # noqa: E731
        tau_range = (0.0, 1.0) if rule == "sigmoid" else (-math.inf, math.inf)  # a probability, or a logit
        pred = PredictorPlan(rank=r, tau=_num(p, "tau", f"{at} predictor", *tau_range),
                             top_k=_int(p, "top_k", f"{at} predictor", 0, I), recall=stat("recall"),
                             sparsity=stat("sparsity"), topk_recall=stat("topk_recall"),
                             topk_sparsity=stat("topk_sparsity"), weights=w, rule=rule, input=inp,
                             source=str(p.get("source", "trained")))
    inputs = None
    if d.get("inputs") is not None:
        q = d["inputs"]
        if not isinstance(q, dict) or not isinstance(q.get("thresholds"), dict) or \
                not isinstance(q.get("sparsity", {}), dict):
            raise HotcoldError(f"{at}: inputs must hold a thresholds object")
        inputs = InputPlan({str(k): _num(q["thresholds"], k, f"{at} input thresholds", 0) for k in q["thresholds"]},
                           {str(k): _num(q.get("sparsity", {}), k, f"{at} input sparsity", finite=False)
                            for k in q.get("sparsity", {})})
    return LayerPlan(index=i, threshold=_num(d, "threshold", at, 0), cett=_num(d, "cett", at, finite=False),
                     sparsity=_num(d, "sparsity", at, finite=False), num_neurons=I, hot_ids=hot_ids,
                     frequency=frequency, predictor=pred, inputs=inputs)


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
