"""Bad input to the plan writers and readers: `hotcold profile` / `plan import` refuse a bad --out, flags beyond
the model's shapes and a GPU budget the dense parts overflow before any work (no model load, no profiling
pass, no folder left behind); load_plan refuses a damaged or inconsistent plan in one line naming the file,
layer and field; `plan import` refuses pickles and bad thresholds in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotcold.cli import main
from hotcold.engine.errors import HotcoldError
from hotcold.engine.plan import (
    HOT_FILE,
    PLAN_JSON,
    PREDICTOR_FILE,
    LayerPlan,
    Plan,
    PredictorPlan,
    load_plan,
    save_plan,
)
from hotcold.profiler.import_plan import build_import_plan, read_predictors

H, I, RANK = 8, 20, 3  # the hand-made plan's sizes


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every model load and profiling pass (and an import's calibration) the command starts."""
    import hotcold.engine.loader as loader
    import hotcold.profiler.collect as collect
    import hotcold.profiler.import_plan as import_plan

    calls: list[str] = []
    load = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: calls.append("load_model") or load(*a, **k))
    monkeypatch.setattr(collect, "run_body", lambda *a, **k: calls.append("run_body"))
    monkeypatch.setattr(import_plan, "calibrate", lambda *a, **k: calls.append("calibrate"))
    return calls


@pytest.fixture
def relu(tiny_checkpoint, capsys: pytest.CaptureFixture[str]) -> Path:
    """The tiny ReLU model (hidden 64, intermediate 136), its building's output kept out of the checks."""
    path = tiny_checkpoint("relu_llama")
    capsys.readouterr()
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and needle in err, err
    return err


def _profile(model: Path, out: str, *flags: str) -> int:
    return main(["profile", "--model", str(model), "--out", out, "--quiet", *flags])


# --- --out, checked before anything loads --------------------------------------------------------------------

@pytest.mark.parametrize("where, needle", [
    ("file/sub", "cannot be created or written to"),  # a folder under a file
    ("file", "exists and is not a folder"),
    ("", "--out is empty"),  # Path("") would be the current folder
    ("/proc/hotcold-no-such/plan", "cannot be created or written to"),
])
def test_bad_out_refused_before_loading(relu, tmp_path, capsys, work, where: str, needle: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / where) if where and not where.startswith("/") else where
    _one_line_error(capsys, _profile(relu, out), needle)
    assert work == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("kind", ["user_folder", "model_folder"])
def test_non_plan_folder_never_overwritten(relu, tmp_path, capsys, work, kind: str) -> None:
    if kind == "user_folder":
        out = tmp_path / "mine"
        (out / "sub").mkdir(parents=True)
        (out / PLAN_JSON).write_text('{"mine": 1}')  # a plan.json that is not a hotcold plan's
        (out / "sub" / "a").write_text("precious")
    else:
        out = relu
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for cmd in (["profile", "--model", str(relu), "--out", str(out), "--quiet"],
                ["plan", "import", str(relu), "--model", str(relu), "--out", str(out)]):
        _one_line_error(capsys, main(cmd), "holds other files and no hotcold plan")
    assert work == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_flags_beyond_the_model_refused_before_loading(relu, tmp_path, capsys, work) -> None:
    """relu_llama: hidden 64, intermediate 136. The --out folders the check tried are removed again."""
    out = str(tmp_path / "a" / "b" / "plan")
    for flags, needle in [(["--predictor-rank", "65"], "--predictor-rank 65 is above the model's hidden size 64"),
                          (["--min-hot-per-layer", "-1"], "--min-hot-per-layer must be in [0, 136]"),
                          (["--min-hot-per-layer", "137"], "--min-hot-per-layer must be in [0, 136]"),
                          (["--min-site-sparsity", "150%"], "--min-site-sparsity must be in [0, 100%]")]:
        _one_line_error(capsys, _profile(relu, out, *flags), needle)
    assert work == []
    assert list(tmp_path.iterdir()) == []


def test_gpu_budget_refused_before_profiling(relu, tmp_path, capsys, work) -> None:
    """The budget against the dense parts: known from the model's shapes, so checked before any pass over the
    corpus (the old code found out at placement, after profiling)."""
    rc = _profile(relu, str(tmp_path / "p"), "--sparsity", "neuron", "--gpu-dtype", "int8", "--gpu-memory", "1KiB",
                  "--tokens", "1000", "--eval-tokens", "200")
    _one_line_error(capsys, rc, "smaller than the dense parts need")
    assert "run_body" not in work
    pi = _powerinfer_folder(tmp_path / "pi", 64, 136)
    rc = main(["plan", "import", str(pi), "--model", str(relu), "--out", str(tmp_path / "p"), "--gpu-dtype", "int8",
               "--gpu-memory", "1KiB"])
    _one_line_error(capsys, rc, "smaller than the dense parts need")
    assert "calibrate" not in work and not (tmp_path / "p").exists()


def test_replacing_a_plan_folder_leaves_no_old_report(relu, tmp_path, capsys) -> None:
    """A plan folder may be profiled again; the older run's report goes when the new one writes none, and the
    user's own files beside it stay."""
    out = tmp_path / "plan"
    save_plan(_small_plan(), out)
    for name in ("report.md", "search.png", "input_sparsity.png", "notes.txt"):
        (out / name).write_text("from the older run")
    rc = _profile(relu, str(out), "--sparsity", "neuron", "--cett", "0", "--tokens", "600", "--eval-tokens", "100",
                  "--predictor-steps", "5", "--no-report")
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([PLAN_JSON, HOT_FILE, PREDICTOR_FILE, "notes.txt"])
    assert load_plan(out).fingerprint != "fp"  # the new plan


def test_cli_error_is_one_line_and_quick(relu, tmp_path) -> None:
    """The command as users run it: one line, in seconds, although the defaults profile 50000 tokens."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOTCOLD_DEBUG", "PYTHONWARNINGS")}
    (tmp_path / "file").write_text("x")
    res = subprocess.run([sys.executable, "-m", "hotcold.cli", "profile", "--model", str(relu),
                          "--out", str(tmp_path / "file" / "plan"), "--quiet"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "cannot be created" in res.stderr, res.stderr


# --- load_plan: every field an executor uses, checked where the plan is read ---------------------------------

def _small_plan() -> Plan:
    layers = []
    for i in range(2):
        w = {"w1": torch.randn(RANK, H), "b1": torch.zeros(RANK), "w2": torch.randn(I, RANK), "b2": torch.zeros(I)}
        pred = PredictorPlan(rank=RANK, tau=0.3, top_k=7, recall=0.9, sparsity=0.5, topk_recall=0.9,
                             topk_sparsity=0.6, weights=w)
        layers.append(LayerPlan(index=i, threshold=0.5, cett=0.1, sparsity=0.5, num_neurons=I,
                                hot_ids=torch.arange(5) * (i + 1), frequency=torch.rand(I), predictor=pred))
    return Plan(fingerprint="fp", layers=layers, model={"hidden_size": H}, placement={"gpu_memory_bytes": 1024})


def _doc(f: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        doc = json.loads((root / PLAN_JSON).read_text())
        f(doc)
        (root / PLAN_JSON).write_text(json.dumps(doc))
    return edit


def _tensors(name: str, f: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        sd = load_file(str(root / name))
        f(sd)
        save_file(sd, str(root / name))
    return edit


def _set(d: dict, key: str, value: object) -> None:
    d[key] = value


def _truncate(root: Path) -> None:
    data = (root / PREDICTOR_FILE).read_bytes()
    (root / PREDICTOR_FILE).write_bytes(data[: len(data) // 2])


HOT0, W1 = "layers.0.hot_ids", "layers.0.predictor.w1"
BAD_PLANS = {
    "threshold NaN": (_doc(lambda d: _set(d["layers"][0], "threshold", float("nan"))),
                      r"plan.json: layer 0: threshold is NaN, expected a finite number >= 0"),
    "threshold text": (_doc(lambda d: _set(d["layers"][1], "threshold", "abc")), r"layer 1: threshold is \"abc\""),
    "top_k negative": (_doc(lambda d: _set(d["layers"][0]["predictor"], "top_k", -5)),
                       r"layer 0 predictor: top_k is -5, expected an integer in \[0, 20\]"),
    "top_k huge": (_doc(lambda d: _set(d["layers"][0]["predictor"], "top_k", 10**9)), r"top_k is 1000000000"),
    "tau NaN": (_doc(lambda d: _set(d["layers"][1]["predictor"], "tau", float("nan"))), r"layer 1 predictor: tau"),
    "version text": (_doc(lambda d: _set(d, "version", "1")), r"has plan version \"1\", this hotcold reads version 1"),
    "model null": (_doc(lambda d: _set(d, "model", None)), r"plan.json: model is null, expected an object"),
    "budget negative": (_doc(lambda d: _set(d["placement"], "gpu_memory_bytes", -1)), r"gpu_memory_bytes is -1"),
    "extra layer": (_doc(lambda d: d["layers"].append(dict(d["layers"][0], index=2))),
                    r"hot_neurons.safetensors holds tensors for layers \[0, 1\], plan.json needs \[0, 1, 2\]"),
    "layer gap": (_doc(lambda d: _set(d["layers"][1], "index", 5)), r"plan.json lists layers \[0, 5\]"),
    "hot_ids out of range": (_tensors(HOT_FILE, lambda sd: _set(sd, HOT0, sd[HOT0] + 100)),
                             r"hot_neurons.safetensors: layers.0.hot_ids holds neuron ids outside 0..19"),
    "hot_ids negative": (_tensors(HOT_FILE, lambda sd: _set(sd, HOT0, sd[HOT0] - 100)), r"outside 0..19"),
    "hot_ids twice": (_tensors(HOT_FILE, lambda sd: _set(sd, HOT0, torch.zeros(5, dtype=torch.int64))),
                      r"layers.0.hot_ids lists a neuron twice"),
    "predictors missing": (lambda root: (root / PREDICTOR_FILE).unlink(), r"predictors.safetensors is missing"),
    "predictors truncated": (_truncate, r"predictors.safetensors cannot be read \("),
    "w1 missing": (_tensors(PREDICTOR_FILE, lambda sd: sd.pop(W1)),
                   r"predictors.safetensors: layers.0.predictor.w1 is missing"),
    "w1 shape": (_tensors(PREDICTOR_FILE, lambda sd: _set(sd, W1, torch.randn(RANK, H + 1))),
                 r"layers.0.predictor.w1 is float32 \[3, 9\], expected float \[3, 8\]"),
    "w1 integer": (_tensors(PREDICTOR_FILE, lambda sd: _set(sd, W1, sd[W1].to(torch.int32))), r"w1 is int32"),
    "w1 NaN": (_tensors(PREDICTOR_FILE, lambda sd: _set(sd, W1, torch.full((RANK, H), float("nan")))),
               r"w1 holds NaN"),
    "rank not the tensors'": (_doc(lambda d: _set(d["layers"][0]["predictor"], "rank", 99)),
                              r"w1 is float32 \[3, 8\], expected float \[99, 8\]"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_refused_in_one_line(tmp_path, case: str) -> None:
    edit, message = BAD_PLANS[case]
    save_plan(_small_plan(), tmp_path)
    load_plan(tmp_path)  # valid before the edit
    edit(tmp_path)
    with pytest.raises(HotcoldError, match=message) as exc:
        load_plan(tmp_path)
    assert "\n" not in str(exc.value) and "KeyError" not in str(exc.value)


def test_bad_plan_through_generate(relu, tmp_path, capsys) -> None:
    save_plan(_small_plan(), tmp_path)
    _doc(lambda d: _set(d["layers"][0], "threshold", float("nan")))(tmp_path)
    rc = main(["generate", "--model", str(relu), "--plan", str(tmp_path), "--prompt", "Hi"])
    _one_line_error(capsys, rc, "threshold is NaN")


# --- plan import: PowerInfer folders -------------------------------------------------------------------------

def _powerinfer_folder(root: Path, hidden: int = H, neurons: int = I, layers: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(layers):
        torch.save({"fc1.weight": torch.randn(RANK, hidden), "fc2.weight": torch.randn(neurons, RANK)},
                   root / f"model_{i}.pt")
    return root


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_refused_in_one_line_without_torch_advice(tmp_path) -> None:
    src = _powerinfer_folder(tmp_path / "pi")
    marker = tmp_path / "ran"
    with open(src / "model_0.pt", "wb") as f:
        pickle.dump({"fc1.weight": _RunsCode(marker)}, f, protocol=2)
    env = {k: v for k, v in os.environ.items() if k not in ("HOTCOLD_DEBUG", "PYTHONWARNINGS")}
    res = subprocess.run([sys.executable, "-m", "hotcold.cli", "plan", "import", str(src), "--model", "unused",
                          "--out", str(tmp_path / "plan")], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr  # torch's warning not shown either
    assert f"{src / 'model_0.pt'} is not a plain tensor file (refused: loading it could run code)" in res.stderr
    assert "weights_only" not in res.stderr and not marker.exists()


def test_powerinfer_files_refused_in_one_line(tmp_path) -> None:
    src = _powerinfer_folder(tmp_path / "pi")
    (src / "model_1.pt").write_bytes(b"")
    with pytest.raises(HotcoldError, match=r"model_1.pt is not a readable PyTorch file \(EOFError"):
        read_predictors(src)
    _powerinfer_folder(src)
    (src / "activation").mkdir()
    pickle.dump(_RunsCode(tmp_path / "ran"), (src / "activation" / "activation_0.pt").open("wb"), protocol=2)
    with pytest.raises(HotcoldError, match=r"activation_0.pt is not a plain tensor file"):
        read_predictors(src)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("config, message", [
    ('{"sparse_threshold": "abc"}', r"config.json: sparse_threshold is 'abc', expected a finite number"),
    ('{"sparse_threshold": NaN}', r"config.json: sparse_threshold is nan, expected a finite number"),
    ('{bad', r"config.json is not valid JSON"),
])
def test_bad_sparse_threshold_refused(tmp_path, config: str, message: str) -> None:
    src = _powerinfer_folder(tmp_path)
    (src / "config.json").write_text(config)
    with pytest.raises(HotcoldError, match=message):
        read_predictors(src)
    assert read_predictors(src, threshold=0.5).threshold == 0.5  # --sparse-threshold wins over the file
    with pytest.raises(HotcoldError, match=r"--sparse-threshold is nan"):
        read_predictors(src, threshold=float("nan"))


def test_activation_counts_of_another_size_refused(relu, tmp_path, work) -> None:
    from hotcold.engine.loader import load_model

    src = _powerinfer_folder(tmp_path, 64, 136)  # relu_llama's sizes
    (src / "activation").mkdir()
    for i in range(2):
        torch.save(torch.ones(100), src / "activation" / f"activation_{i}.pt")
    loaded = load_model(relu, dtype="float32", device="cpu")
    with pytest.raises(HotcoldError, match=r"layer 0: 100 activation counts, the model has 136 neurons"):
        build_import_plan(loaded, read_predictors(src), [[3, 4, 5]], None)
    assert "calibrate" not in work
