"""`hotcold plan import`: predictors shipped with a model (TurboSparse/Bamboo `mlp.predictor`, PowerInfer
`model_{i}.pt`) become a plan whose executor decides like PowerInfer: logit = fc2 @ relu(fc1 @ r) >= threshold
on r, the residual before the FFN norm. References are float64 brute force on transformers' residual stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_published_checkpoint, published_reference

from hotcold.engine.errors import HotcoldError
from hotcold.engine.hybrid import HybridConfig, HybridFFN, apply_hybrid
from hotcold.engine.loader import load_model
from hotcold.engine.plan import load_plan, save_plan
from hotcold.profiler.import_plan import build_import_plan, read_predictors

PROMPT = list(range(3, 27))
MARGIN = 1e-4  # logits this close to the threshold may round either way in float32


@pytest.fixture(scope="module")
def bamboo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_published_checkpoint("bamboo", tmp_path_factory.mktemp("bamboo") / "model")


def _plan(path: Path, threshold: float | None = None):
    loaded = load_model(path, dtype="float32", device="cpu")
    plan = build_import_plan(loaded, read_predictors(path, threshold), [PROMPT], None)
    return loaded, plan


def _reference(path: Path, normed: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (float64 logits, active mask) of the checkpoint's own fc1/fc2 on transformers' residual
    before post_attention_layernorm (or, normed=True, on the norm's output)."""
    model = published_reference("bamboo", path)
    state = load_file(str(path / "model.safetensors"))
    seen: list[torch.Tensor] = []
    hooks = []
    for layer in model.model.layers:
        norm = layer.post_attention_layernorm
        if normed:
            hooks.append(norm.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().double())))
        else:
            hooks.append(norm.register_forward_pre_hook(lambda m, i: seen.append(i[0][0].detach().double())))
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    out = []
    for i, r in enumerate(seen):
        w1 = state[f"model.layers.{i}.mlp.predictor.fc1.weight"].double()
        w2 = state[f"model.layers.{i}.mlp.predictor.fc2.weight"].double()
        logits = torch.relu(r @ w1.T) @ w2.T
        out.append((logits, logits >= 0))
    return out


def _engine_masks(loaded, plan) -> list[torch.Tensor]:
    """The masks the hybrid executor's predictors compute in predictor mode for PROMPT, per layer. Every neuron
    is then computed anyway, so each layer sees the dense model's residual stream, as the reference does."""
    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", placement="cpu"), loaded.fingerprint, "cpu", 0)
    masks: list[torch.Tensor] = []

    def record(x: torch.Tensor, residual: torch.Tensor | None = None, *, f) -> tuple[torch.Tensor, None]:
        masks.append(f(x, residual)[0])
        return torch.ones_like(masks[-1]), None

    for block in loaded.model.layers:
        assert isinstance(block.ffn, HybridFFN)
        block.ffn.active_mask = lambda x, residual=None, f=block.ffn.active_mask: record(x, residual, f=f)
    with torch.no_grad():
        loaded.model.forward_sequence(torch.tensor(PROMPT))
    return masks


def _agree(mask: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    logits, want = ref
    clear = logits.abs() > MARGIN
    return float((mask.cpu() == want)[clear].float().mean())


def test_imported_masks_equal_fc1_fc2_on_the_pre_norm_residual(bamboo: Path) -> None:
    loaded, plan = _plan(bamboo)
    assert all(lp.predictor.input == "residual" and lp.predictor.rule == "logit" for lp in plan.layers)
    assert all("b1" not in lp.predictor.weights for lp in plan.layers)
    ref = _reference(bamboo)
    masks = _engine_masks(loaded, plan)
    assert len(masks) == len(ref) == 2
    for m, r in zip(masks, ref, strict=True):
        assert _agree(m, r) == 1.0
        assert 0 < int(r[1].sum()) < r[1].numel()  # the rule decides something: neither all nor nothing


def test_feeding_the_normed_input_gives_other_masks(bamboo: Path) -> None:
    """What the previous test would see if the executor fed the FFN's normed input: disagreement."""
    loaded, plan = _plan(bamboo)
    for lp in plan.layers:
        lp.predictor.input = "ffn_norm"
    masks = _engine_masks(loaded, plan)
    ref = _reference(bamboo)
    assert min(_agree(m, r) for m, r in zip(masks, ref, strict=True)) < 0.99  # the test above needs 1.0
    normed = _reference(bamboo, normed=True)  # and it does match fc1/fc2 on the normed input: the only change
    assert all(_agree(m, r) == 1.0 for m, r in zip(masks, normed, strict=True))


def test_powerinfer_folder_layers_by_number(tmp_path: Path) -> None:
    H, r, I = 8, 2, 6
    for i in range(11):
        torch.save({"fc1.weight": torch.full((r, H), float(i)), "fc2.weight": torch.full((I, r), float(i))},
                   tmp_path / f"model_{i}.pt")
    (tmp_path / "activation").mkdir()
    for i in range(11):
        torch.save(torch.arange(I) * (i + 1), tmp_path / "activation" / f"activation_{i}.pt")
    (tmp_path / "config.json").write_text(json.dumps({"sparse_threshold": 0.25}))
    got = read_predictors(tmp_path)
    assert list(got.weights) == list(range(11))  # inserted in numeric order, not model_10 before model_2
    assert float(got.weights[2]["w1"][0, 0]) == 2.0 and float(got.weights[10]["w1"][0, 0]) == 10.0
    assert float(got.counts[2][1]) == 3.0 and float(got.counts[10][1]) == 11.0
    assert got.threshold == 0.25 and got.source == "powerinfer"
    assert read_predictors(tmp_path, threshold=-1.0).threshold == -1.0
    (tmp_path / "activation" / "activation_10.pt").unlink()
    with pytest.raises(HotcoldError, match="all layers or none"):
        read_predictors(tmp_path)


def _hotcold(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HOTCOLD_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hotcold.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_import_then_generate(bamboo: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    res = _hotcold("plan", "import", str(bamboo), "--model", str(bamboo), "--out", str(out), "--tokens", "256",
                   "--gpu-memory", "all")
    assert res.returncode == 0, res.stderr
    assert "recall" in res.stdout and "sparsity" in res.stdout
    loaded = load_model(bamboo, dtype="float32", device="cpu")
    plan = load_plan(out, fingerprint=loaded.fingerprint)  # validates, and is for this model
    assert [lp.index for lp in plan.layers] == [0, 1]
    assert all(0 <= lp.predictor.recall <= 1 and lp.predictor.input == "residual" for lp in plan.layers)
    gen = _hotcold("generate", "--model", str(bamboo), "--plan", str(out), "--sparsity", "predictor",
                   "--prompt", "Hello", "--max-tokens", "4")
    assert gen.returncode == 0, gen.stderr


def test_powerinfer_folder_import_uses_its_counts_for_placement(bamboo: Path, tmp_path: Path) -> None:
    state = load_file(str(bamboo / "model.safetensors"))
    src = tmp_path / "predictor"
    (src / "activation").mkdir(parents=True)
    for i in range(2):
        torch.save({"fc1.weight": state[f"model.layers.{i}.mlp.predictor.fc1.weight"],
                    "fc2.weight": state[f"model.layers.{i}.mlp.predictor.fc2.weight"]}, src / f"model_{i}.pt")
        I = state[f"model.layers.{i}.mlp.predictor.fc2.weight"].shape[0]
        torch.save(torch.arange(I).flip(0) + 100 * i, src / "activation" / f"activation_{i}.pt")
    (src / "config.json").write_text(json.dumps({"sparse_threshold": 0.5}))
    loaded = load_model(bamboo, dtype="float32", device="cpu")
    imported = read_predictors(src)
    everything = build_import_plan(loaded, imported, [PROMPT], None, 2, context=1, batch=1).placement
    assert everything["hot_neurons"] == everything["total_neurons"]
    k = 40  # room for 40 neurons after the dense parts
    budget = everything["reserved_bytes"] + k * everything["neuron_bytes"]
    plan = build_import_plan(loaded, imported, [PROMPT], budget, 2, context=1, batch=1)
    assert plan.layers[0].hot_count == 0  # layer 1 counts are larger (+100), highest for neuron 0
    assert plan.layers[1].hot_ids.tolist() == list(range(k))
    assert plan.placement["frequency_source"] == "powerinfer activation counts"
    assert all(lp.predictor.tau == 0.5 and lp.predictor.source == "powerinfer" for lp in plan.layers)
    save_plan(plan, tmp_path / "plan")
    assert load_plan(tmp_path / "plan").layers[0].predictor.rule == "logit"


def test_threshold_so_low_every_neuron_is_active_equals_dense(bamboo: Path) -> None:
    loaded, plan = _plan(bamboo, threshold=-1e30)
    with torch.no_grad():
        dense = loaded.model.forward_sequence(torch.tensor(PROMPT)).double()
    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", placement="hybrid"), loaded.fingerprint,
                 "cpu", 1)
    with torch.no_grad():
        sparse = loaded.model.forward_sequence(torch.tensor(PROMPT)).double()
    assert loaded.model.ffn_counters.sparsity == 0.0
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
