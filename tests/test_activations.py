"""Every FFN activation, including dReLU and ReLU² which transformers lacks for gated models, against a
float64 Llama forward written here from the checkpoint's raw tensors (independent of hotcold's model)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hotcold.engine.loader import load_model

ACT64 = {
    "swiglu": lambda g, u: F.silu(g) * u,
    "reglu": lambda g, u: F.relu(g) * u,
    "drelu": lambda g, u: F.relu(g) * F.relu(u),
    "geglu": lambda g, u: F.gelu(g) * u,
}


def llama_forward64(folder, ids: list[int], act) -> torch.Tensor:
    """A plain float64 Llama: RMSNorm, rotate-half RoPE, causal GQA attention, gated FFN, tied/untied head."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = H // nh, cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(x):
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd)).repeat_interleave(nh // nkv, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).repeat_interleave(nh // nkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5 + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, H)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + act(g, u) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("activation", list(ACT64))
def test_gated_activations_against_float64(activation, tiny_checkpoint):
    path = tiny_checkpoint("llama")
    ids = list(range(5, 25))
    ours = load_model(path, dtype="float32", activation=activation).model.forward_sequence(torch.tensor(ids))
    ref = llama_forward64(path, ids, ACT64[activation])
    err = (ours.double() - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


def test_activation_override_changes_the_model(tiny_checkpoint):
    """The override is really used: dReLU and SwiGLU give different logits on the same weights."""
    path = tiny_checkpoint("llama")
    a = load_model(path, activation="drelu").model.forward_sequence(torch.tensor([3, 4, 5]))
    b = load_model(path).model.forward_sequence(torch.tensor([3, 4, 5]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind,activation", [("opt", "relu"), ("opt_relu2", "relu2"), ("opt_gelu", "gelu")])
def test_plain_activations_are_read_from_config(kind, activation, tiny_checkpoint):
    """Non-gated ReLU, ReLU² and GELU come from `activation_function` (their logits are checked against
    transformers in test_engine_arch)."""
    assert load_model(tiny_checkpoint(kind)).config.activation == activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "reglu", "drelu", "geglu", "relu", "relu2", "gelu"])
def test_dense_ffn_paths_against_float64(activation, dtype):
    """DenseFFN on 1-9 tokens (native kernels up to the calibrated token count, torch above), biases included."""
    from hotcold.engine.layers import DenseFFN
    from hotcold.kernels import native

    gen = torch.Generator().manual_seed(7)
    I, H = 70, 40
    gated = activation in ACT64

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    gate, up, down_t = (rnd(I, H) if gated else None), rnd(I, H), rnd(I, H)
    ub, gb, db = rnd(I), (rnd(I) if gated else None), rnd(H)
    ffn = DenseFFN(activation, up, down_t, gate, ub, gb, db)
    plain = {"relu": F.relu, "relu2": lambda u: F.relu(u).square(), "gelu": F.gelu}
    for T in (1, 2, 3, 9):
        x = rnd(T, H)
        xd = x.double()
        u = xd @ up.double().T + ub.double()
        h = ACT64[activation](xd @ gate.double().T + gb.double(), u) if gated else plain[activation](u)
        want = h @ down_t.double() + db.double()
        got = ffn(x)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: h and the output are rounded to bf16
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), (T, native.preferred(T, up))
