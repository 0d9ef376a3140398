"""The published activation-sparse families (issue 12, item 1): ProSparse (sparsellama, FATReLU), MiniCPM-S (FATReLU
and MiniCPM's scalings, config without model_type), Bamboo (dReLU although hidden_act says relu) and TurboSparse-
Mixtral (dReLU experts), each chosen by architecture; FATReLU's threshold on every path (dense torch, native
gathered and quantized kernels, Triton, oracle masks and the profiler's taps); unknown custom code refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hybrid import make_plan
from tiny_models import PUBLISHED, make_published_checkpoint, published_reference

from hotcold.engine import config as configs
from hotcold.engine import model as engine_model
from hotcold.engine.cache import KVCache
from hotcold.engine.errors import HotcoldError
from hotcold.engine.hybrid import HybridConfig, apply_hybrid
from hotcold.engine.loader import load_model
from hotcold.engine.model import StepBatch
from hotcold.engine.sparsity import sparsified
from hotcold.kernels import cpu_sparse, native, quant, reference
from hotcold.profiler import collect

PROMPT = list(range(3, 27))  # 24 tokens: past Bamboo's 16-token window in the tiny config
TABLE = [5, 1, 7, 0, 3, 2, 6, 4]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    """kind -> checkpoint folder, built once per module."""
    root, cache = tmp_path_factory.mktemp("published"), {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_published_checkpoint(kind, root / kind)
        return cache[kind]

    return get


def _err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference logits' scale."""
    return (ours.double() - ref.double()).abs().max().item() / ref.abs().max().item()


def _cached_logits(model, ids: list[int], decode: int = 4) -> list[torch.Tensor]:
    """Prefill logits [L, V], then `decode` single-token steps through the paged KV cache (last logits each)."""
    cfg = model.config
    cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
    out = [model(torch.tensor(ids), StepBatch([TABLE], [0], [len(ids)]), cache)]
    ids = list(ids)
    for _ in range(decode):
        ids.append(int(out[-1][-1].argmax()))
        out.append(model(torch.tensor(ids[-1:]), StepBatch([TABLE], [len(ids) - 1], [1]), cache))
    return out, ids


# ---------------------------------------------------------------- configuration: chosen by architecture

def test_configs_map_by_architecture(published):
    want = {  # kind -> (arch, activation, threshold, window, experts)
        "prosparse_llama": ("sparsellama", "fatrelu", 0.01, None, 0),
        "minicpm_s": ("minicpm", "fatrelu", 0.03, None, 0),
        "bamboo": ("bamboo", "drelu", 0.0, 16, 0),
        "turbosparse_mixtral": ("turbosparsemixtral", "drelu", 0.0, None, 4),
    }
    for kind, (arch, act, t, window, experts) in want.items():
        cfg = configs.from_hf_config(PUBLISHED[kind][1])
        assert (cfg.arch, cfg.activation, cfg.activation_threshold, cfg.sliding_window, cfg.num_experts) == (
            arch, act, t, window, experts), kind
    mini = configs.from_hf_config(PUBLISHED["minicpm_s"][1])
    assert mini.tie_word_embeddings and mini.embed_scale == 12.0
    assert mini.residual_scale == pytest.approx(1.4 / math.sqrt(2)) and mini.logit_divisor == 64 / 16
    # hidden_act alone decides nothing: "relu" is ReGLU for Llama, dReLU for Bamboo; fatrelu needs its family
    llama_relu = dict(PUBLISHED["bamboo"][1], architectures=["LlamaForCausalLM"], model_type="llama")
    assert configs.from_hf_config(llama_relu).activation == "reglu"
    # the new fields enter the fingerprint only where set: other models' plans stay valid
    assert "activation_threshold" not in configs.from_hf_config(llama_relu).to_dict()
    assert configs.from_hf_config(PUBLISHED["prosparse_llama"][1]).to_dict()["activation_threshold"] == 0.01
    with pytest.raises(HotcoldError, match="unsupported activation 'fatrelu'"):
        configs.from_hf_config(dict(PUBLISHED["prosparse_llama"][1], model_type="llama"))
    with pytest.raises(HotcoldError, match="bamboo with hidden_act 'silu'"):
        configs.from_hf_config(dict(PUBLISHED["bamboo"][1], hidden_act="silu"))


@pytest.mark.parametrize("model_type", ["qwen3_next_custom", None])
def test_unknown_custom_architecture_is_refused_in_one_line(published, tmp_path, model_type):
    folder = tmp_path / "custom"
    folder.mkdir()
    for f in published("prosparse_llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = dict(PUBLISHED["prosparse_llama"][1], architectures=["FancySparseForCausalLM"],
               auto_map=json.loads(json.dumps(PUBLISHED["prosparse_llama"][1]["auto_map"]).replace(
                   "SparseLlama", "FancySparse")))
    cfg.pop("model_type")
    if model_type:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HotcoldError) as err:
        load_model(folder, dtype="float32")
    msg = str(err.value)
    assert "\n" not in msg and "FancySparseForCausalLM" in msg and "unsupported architecture" in msg
    assert "auto_map" in msg


# ---------------------------------------------------------------- logits against transformers

@pytest.mark.parametrize("kind", ["prosparse_llama", "bamboo", "turbosparse_mixtral"])
def test_logits_match_transformers_with_the_real_activation(kind, published):
    path = published(kind)
    ref = published_reference(kind, path)
    model = load_model(path, dtype="float32").model
    steps, ids = _cached_logits(model, PROMPT)
    with torch.no_grad():
        full = ref(torch.tensor([ids])).logits[0]
    assert _err(steps[0], full[: len(PROMPT)]) <= 1e-4
    for i, step in enumerate(steps[1:]):
        assert _err(step[-1], full[len(PROMPT) + i]) <= 1e-4


@pytest.mark.parametrize("kind,plain", [("prosparse_llama", "reglu"), ("bamboo", "reglu")])
def test_the_activation_matters(kind, plain, published):
    """Plain ReLU(gate) * up on the same weights is far from the reference: FATReLU's threshold (a quarter of the
    gate pre-activations lie in [0, t)) and dReLU's relu(up) both change the logits."""
    path = published(kind)
    ref = published_reference(kind, path)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    ours = load_model(path, dtype="float32").model.forward_sequence(PROMPT)
    relu = load_model(path, dtype="float32", activation=plain).model.forward_sequence(PROMPT)
    assert _err(ours, expected) <= 1e-4
    assert _err(relu, expected) >= 1e-2
    if kind == "prosparse_llama":  # transformers' own ReLU agrees with our ReLU: the gap is the threshold alone
        with torch.no_grad():
            theirs_relu = published_reference(kind, path, activation="relu")(torch.tensor([PROMPT])).logits[0]
        assert _err(relu, theirs_relu) <= 1e-4


def _minicpm_forward(path: Path, ids: list[int], neutral: bool = False) -> torch.Tensor:
    """MiniCPM-S in float64, written from its modeling code: embeddings x scale_emb, residual branches x
    scale_depth / sqrt(L), FATReLU(gate) * up, logits of hidden / (hidden_size / dim_model_base), tied head.
    `neutral`: every scaling 1 and plain ReLU (a Llama with ReLU), to check this forward itself."""
    from safetensors.torch import load_file

    c = json.loads((path / "config.json").read_text())
    w = {k.removeprefix("model."): v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    H, L, nh, nkv = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    D, T = H // nh, len(ids)
    emb, depth = (1.0, 1.0) if neutral else (c["scale_emb"], c["scale_depth"] / math.sqrt(L))
    divisor, t = (1.0, 0.0) if neutral else (H / c["dim_model_base"], c["hidden_act_param"])

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * weight

    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rope(v):
        return v * cos + torch.cat([-v[..., D // 2:], v[..., : D // 2]], -1) * sin

    x = w["embed_tokens.weight"][torch.tensor(ids)] * emb
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, D))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, D)).repeat_interleave(nh // nkv, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, D).repeat_interleave(nh // nkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        a = torch.einsum("hqk,khd->qhd", s.masked_fill(~causal, -math.inf).softmax(-1), v).reshape(T, H)
        x = x + (a @ w[p + "self_attn.o_proj.weight"].T) * depth
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        g = torch.where(g >= t, g, 0.0) if not neutral else torch.relu(g)
        x = x + ((g * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T) * depth
    return (rms(x, w["norm.weight"]) / divisor) @ w["embed_tokens.weight"].T


def test_minicpm_matches_its_float64_forward(published):
    path = published("minicpm_s")
    assert not (path / "config.json").read_text().count('"model_type"')
    # the float64 forward itself: with MiniCPM's scalings neutral and plain ReLU it is transformers' Llama
    with torch.no_grad():
        llama_relu = published_reference("minicpm_s", path, activation="relu")(torch.tensor([PROMPT])).logits[0]
    assert _err(_minicpm_forward(path, PROMPT, neutral=True), llama_relu) <= 1e-5
    model = load_model(path, dtype="float32").model
    steps, ids = _cached_logits(model, PROMPT)
    expected = _minicpm_forward(path, ids)
    assert _err(steps[0], expected[: len(PROMPT)]) <= 1e-4
    for i, step in enumerate(steps[1:]):
        assert _err(step[-1], expected[len(PROMPT) + i]) <= 1e-4
    # each scaling and the threshold matter
    assert _err(load_model(path, dtype="float32", activation="reglu").model.forward_sequence(PROMPT),
                expected[: len(PROMPT)]) >= 1e-2
    for field in ("embed_scale", "residual_scale", "logit_divisor"):
        original = getattr(model.config, field)
        setattr(model.config, field, 1.0)
        try:
            if field == "residual_scale":
                for block in model.layers:
                    block.residual_scale = 1.0
            assert _err(model.forward_sequence(PROMPT), expected[: len(PROMPT)]) >= 1e-2, field
        finally:
            setattr(model.config, field, original)
            for block in model.layers:
                block.residual_scale = model.config.residual_scale


# ---------------------------------------------------------------- oracle sparsity, profiler taps

@pytest.mark.parametrize("kind", ["prosparse_llama", "minicpm_s", "bamboo"])
@pytest.mark.parametrize("split", ["random", "none"])
def test_oracle_at_cett_zero_equals_dense(kind, split, published):
    """Threshold-0 plans (what CETT 0 gives) skip exactly the zeros: the hybrid executor and the unfused
    MaskedFFN both equal dense."""
    path = published(kind)
    dense = load_model(path, dtype="float32").model.forward_sequence(torch.tensor(PROMPT))
    loaded = load_model(path, dtype="float32")
    plan = make_plan(loaded, split, seed=3)
    with sparsified(loaded.model, plan, "oracle"):
        masked = loaded.model.forward_sequence(torch.tensor(PROMPT))
    assert _err(masked, dense) <= 1e-5
    apply_hybrid(loaded.model, plan, HybridConfig(mode="oracle"), loaded.fingerprint, workers=1)
    assert _err(loaded.model.forward_sequence(torch.tensor(PROMPT)), dense) <= 1e-5
    short = loaded.model.forward_sequence(torch.tensor(PROMPT[:6]))  # decode-sized: the gathered path
    assert _err(short, dense[:6]) <= 1e-5
    sparsity = loaded.model.ffn_counters.sparsity
    assert sparsity is not None and 0.3 < sparsity < 1


@pytest.mark.parametrize("kind", ["prosparse_llama", "bamboo"])
def test_predictor_path_computes_the_activation_in_the_gathered_kernels(kind, published):
    """A predictor that calls every neuron active, never switching to the dense product: the hybrid executor's
    gathered kernels compute h themselves, so the threshold must reach them to equal dense. (Native vs torch
    inside cpu_sparse is the calibration's choice; the native kernels are checked directly below.)"""
    path = published(kind)
    dense = load_model(path, dtype="float32").model.forward_sequence(torch.tensor(PROMPT[:4]))
    loaded = load_model(path, dtype="float32")
    cfg = loaded.config
    rank = 4
    predictor = {"w1": torch.zeros(rank, cfg.hidden_size), "b1": torch.zeros(rank),
                 "w2": torch.zeros(cfg.intermediate_size, rank), "b2": torch.full((cfg.intermediate_size,), 10.0)}
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=5, predictor=predictor),
                 HybridConfig(mode="predictor", dense_above=2.0), loaded.fingerprint, workers=1)  # never dense
    assert _err(loaded.model.forward_sequence(torch.tensor(PROMPT[:4])), dense) <= 1e-5


def test_profiler_sees_fatrelu_zeros(published):
    """The profiler's taps (CETT samples, frequencies) get h with FATReLU's zeros: h == 0 wherever gate < t."""
    path = published("prosparse_llama")
    loaded = load_model(path, dtype="float32")
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with collect.replaced_ffns(loaded.model, lambda i, f: collect.FFNTap(f, i, lambda n, x, h: seen.update(
            {n: (x, h)}))):
        loaded.model.forward_sequence(torch.tensor(PROMPT))
    ffn = collect.dense_ffns(loaded.model)[0]
    x, h = seen[0]
    g = x.double() @ ffn.gate.double().T
    u = x.double() @ ffn.up.double().T
    assert torch.allclose(h.double(), torch.where(g >= 0.01, g, 0.0) * u, atol=1e-5)
    band = (g >= 0) & (g < 0.01)
    assert band.float().mean() > 0.1 and (h[band] == 0).all()


# ---------------------------------------------------------------- kernels with a threshold

def _fatrelu_ref(x, w_gate, w_up, idx, t, mask=None):
    g = x.double() @ w_gate.double()[idx].T
    h = torch.where(g >= t, g, 0.0) * (x.double() @ w_up.double()[idx].T)
    return h if mask is None else torch.where(mask, h, 0.0)


def _case(t: float, B: int = 3, I: int = 96, H: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wgu = torch.randn(I, 2, H, generator=gen) / 16  # gate pre-activations ~ N(0, 1/4): a quarter in [0, 0.3)
    x = torch.randn(B, H, generator=gen)
    idx = torch.randperm(I, generator=gen)[: I // 2]
    mask = torch.rand(B, idx.numel(), generator=gen) > 0.3
    return x, wgu, idx, mask


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_gathered_kernels_apply_the_threshold(t):
    x, wgu, idx, mask = _case(t)
    spec = reference.with_threshold("fatrelu", t)
    w_gate, w_up = wgu[:, 0], wgu[:, 1]
    want = _fatrelu_ref(x, w_gate, w_up, idx, t, mask)
    g = x.double() @ w_gate.double()[idx].T
    assert ((g >= 0) & (g < 0.3)).float().mean() > 0.1  # the band the threshold removes is well populated
    for impl in (reference, cpu_sparse):
        h = impl.gathered_gate_up(x, w_up, idx, spec, w_gate, None, mask)
        assert (h.double() - want).abs().max() <= 1e-5
    down_t = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    y_want = want @ down_t.double()[idx]
    y = cpu_sparse.gathered_ffn(x, w_up, down_t, idx, spec, w_gate, None, mask)  # one native call when built
    assert (y.double() - y_want).abs().max() <= 1e-4 * y_want.abs().max()
    if native.load() is not None:
        y = native.gathered_ffn(wgu, 2, down_t, idx, x, 6, 0, token_mask=mask, threshold=t)
        assert (y.double() - y_want).abs().max() <= 1e-4 * y_want.abs().max()


@pytest.mark.parametrize("tokens", [2, 40])  # the native call, and past the crossover the torch path
def test_quantized_ffn_applies_the_threshold(tokens):
    """Integer activations with 127 in every 32-block quantize to int8 exactly, so the kernels' gate values are
    exact and FATReLU's jump at t cannot blur the comparison; t is put between two gate values."""
    gen = torch.Generator().manual_seed(2)
    I, H = 64, 64
    gate, up = torch.randn(I, H, generator=gen) / 8, torch.randn(I, H, generator=gen) / 8
    down = torch.randn(H, I, generator=gen) / 8
    x = torch.randint(-127, 128, (tokens, H), generator=gen).float()
    x[:, ::32] = 127.0
    qg, qu, qd = (quant.quantize(m, "Q8_0") for m in (gate, up, down))
    g, u = x.double() @ qg.dequantize().double().T, x.double() @ qu.dequantize().double().T
    positive = g[g > 0].sort().values
    k = len(positive) // 3
    t = float(positive[k] + positive[k + 1]) / 2  # a third of the positive gates lie in [0, t)
    y = quant.ffn(x, quant.interleave(qg, qu), qd, 2, 6, 0, max_native_tokens=8, threshold=t)
    want = (torch.where(g >= t, g, 0.0) * u) @ qd.dequantize().double().T
    relu = (torch.relu(g) * u) @ qd.dequantize().double().T
    scale = want.abs().max().item()
    assert (y.double() - want).abs().max().item() <= 1e-2 * scale  # h is re-quantized to int8 for down
    assert (relu - want).abs().max().item() > 0.1 * scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", ["prosparse_llama", "minicpm_s"])
def test_quantized_engine_runs_fatrelu(kind, published, monkeypatch):
    """--quantize q8_0: ProSparse's one-call native blocks (block.c) equal the per-op path (quant.ffn, checked
    exactly above); MiniCPM, whose scalings that kernel lacks, runs per op. Both stay nearer the float FATReLU
    model than the float ReLU one (FATReLU's jump at t makes int8 errors larger than a ReLU model's)."""
    path = published(kind)
    ids = torch.tensor(PROMPT)
    q = load_model(path, quantize="q8_0").model
    dense = load_model(path, dtype="float32").model.forward_sequence(ids)
    relu = load_model(path, dtype="float32", activation="reglu").model.forward_sequence(ids)
    if kind == "prosparse_llama":
        assert q._native_blocks() is not None
        blocks, _ = _cached_logits(q, PROMPT, decode=0)
        monkeypatch.setattr(engine_model, "NATIVE_BLOCKS", False)
        per_op, _ = _cached_logits(q, PROMPT, decode=0)
        assert _err(blocks[0], per_op[0]) <= 1e-4
        ours = blocks[0]
    else:
        assert q._native_blocks() is None
        ours = _cached_logits(q, PROMPT, decode=0)[0][0]
    assert 2 * _rel(ours, dense) < _rel(ours, relu)


_TRITON_SCRIPT = """
import torch
from hotcold.kernels import reference, triton_ffn
gen = torch.Generator().manual_seed(0)
x, wg = torch.randn(3, 64, generator=gen), torch.randn(96, 64, generator=gen) / 16
wu = torch.randn(96, 64, generator=gen)
idx = torch.randperm(96, generator=gen)[:40]
for t in (0.0, 0.3):
    spec = reference.with_threshold("fatrelu", t)
    h = triton_ffn.gathered_gate_up(x, wu, idx, spec, wg)
    g = x.double() @ wg.double()[idx].T
    want = torch.where(g >= t, g, 0.0) * (x.double() @ wu.double()[idx].T)
    print(t, float((h.double() - want).abs().max()), float(((g >= 0) & (g < t)).float().mean()))
"""


def test_triton_kernel_applies_the_threshold():
    out = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == ["0.0", "0.3"]
    assert all(float(err) <= 1e-5 for _, err, _ in rows)
    assert float(rows[1][2]) > 0.1  # the threshold's band is populated
