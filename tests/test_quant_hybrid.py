"""A plan over quantized weights with a GPU side (engine/quant_hybrid.py): hot rows as quantized QRows read by
the GPU side's kernels, cold rows as the checkpoint's blocks on the CPU. Here the "GPU side" runs on the CPU:
through the kernels' torch reference in this process, and through the Triton kernels in Triton's interpreter
(a child pytest). References: the dense quantized model, and transformers with gguf's Q8_0 round trip and the
switched-off neurons zeroed (test_quant_sparse_engine's)."""

from __future__ import annotations

import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases
from test_hybrid import make_plan
from test_quant_sparse_engine import PROMPT, _close, _keep_only
from test_quantized_engine import quantized_reference
from tiny_models import fixed_set_predictor, predictor_picks_f64, token_dependent_predictor

from hotcold.engine.hybrid import HybridConfig, apply_hybrid, move_dense_parts
from hotcold.engine.loader import load_model
from hotcold.engine.quant_hybrid import QuantHybridFFN
from hotcold.kernels import quant
from hotcold.kernels.qrows import QRows


def _split_model(tiny_checkpoint, backend: str, mode: str, qtype: str = "q8_0"):
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize=qtype, activation="reglu")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=3)
    plan = make_plan(loaded, "random", seed=1, predictor=weights if mode == "predictor" else None)
    dense = loaded.model.forward_sequence(torch.tensor(PROMPT))
    counters = apply_hybrid(loaded.model, plan, HybridConfig(mode=mode, backend=backend), loaded.fingerprint,
                            gpu_device="cpu", workers=1)
    return path, loaded, plan, keep, dense, counters


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_split_at_threshold_zero_is_the_dense_model(qtype, tiny_checkpoint):
    """Oracle at threshold 0, neurons split at random between the sides: the dense model's logits (within
    the int8 activations and the hot side's Q8_0 down rows), and both sides did work."""
    _, loaded, _, _, dense, counters = _split_model(tiny_checkpoint, "reference", "oracle", qtype)
    assert all(isinstance(layer.ffn, QuantHybridFFN) for layer in loaded.model.layers)
    _close(loaded.model.forward_sequence(torch.tensor(PROMPT)), dense)
    assert 0 < counters.hot_share < 1


def test_each_neurons_rows_live_on_one_side(tiny_checkpoint):
    """The hot side's quantized rows and the cold side's blocks partition the layer: every neuron once, and
    gate/up take the file's bytes (nothing re-quantized); down is Q8_0 neuron-major rows, once."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q4_0", activation="reglu")
    gate_up_bytes = [quant.untile(layer.ffn.gate_up).nbytes for layer in loaded.model.layers]
    plan = make_plan(loaded, "random", seed=2)
    apply_hybrid(loaded.model, plan, HybridConfig(mode="oracle", backend="reference"), loaded.fingerprint,
                 gpu_device="cpu")
    n = loaded.config.intermediate_size
    for layer, lp, nbytes in zip(loaded.model.layers, plan.layers, gate_up_bytes):
        f = layer.ffn
        assert f.num_hot == lp.hot_ids.numel() and f.num_hot + f.num_cold == n
        assert sorted(f.hot_ids.tolist() + f.cold_ids.tolist()) == list(range(n))
        assert f.hot_up.nbytes + f.hot_gate.nbytes + f.cold_gate_up.nbytes == nbytes
        assert f.hot_down.shape[0] + f.cold_down_t.shape[0] == n and f.cold_down_t.qtype == "Q8_0"


def test_predictor_mask_is_what_gets_computed(tiny_checkpoint):
    """A predictor that always picks a known neuron set: transformers with the other neurons zeroed."""
    path, loaded, _, keep, _, counters = _split_model(tiny_checkpoint, "reference", "predictor")
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = _keep_only(quantized_reference(path), keep.float(), "reglu")(torch.tensor([PROMPT])).logits[0]
    _close(got, want)
    assert counters.sparsity == pytest.approx(1 - keep.float().mean().item(), abs=1e-6)


@pytest.mark.parametrize("placement", ["hybrid", "gpu"])
def test_each_token_sums_its_own_predicted_neurons(placement, tiny_checkpoint):
    """A predictor whose picks differ from token to token, layer 0 alone (one token, a decode batch, a
    prefill-sized chunk): each token must sum exactly its own picks, not its batch's union nor the first
    token's set, on the hot side (ids compacted on its device) and the cold one. Reference: float64 relu(gate) *
    up with each token's picks, from transformers' weights after gguf's Q8_0 round trip."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0", activation="reglu")
    cfg = loaded.config
    weights = token_dependent_predictor(cfg.hidden_size, cfg.intermediate_size, seed=8)
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=1, predictor=weights),
                 HybridConfig(backend="reference", placement=placement), loaded.fingerprint, gpu_device="cpu",
                 workers=1)
    ffn = loaded.model.layers[0].ffn
    assert ffn.num_hot > 0 and (ffn.num_cold > 0) == (placement == "hybrid")
    mlp = quantized_reference(path).model.layers[0].mlp
    gate, up, down = (m.weight.detach().double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    gen = torch.Generator().manual_seed(4)
    for T in (1, 5, 40):
        x = torch.randn(T, cfg.hidden_size, generator=gen)
        keep = predictor_picks_f64(weights, x)
        assert T == 1 or ((keep[1:] & ~keep[0]).any() and (keep.any(0) & ~keep).any())  # per-token sets differ
        want = (torch.relu(x.double() @ gate.T) * (x.double() @ up.T) * keep) @ down.T
        err, scale = (ffn(x).double() - want).abs().max().item(), want.abs().max().item()
        assert err <= 0.03 * scale, (T, err, scale)


def test_quantized_hybrid_under_the_interpreter():
    run_interpreter_cases(__file__, min_passed=2)


if INTERPRETED:

    @pytest.mark.parametrize("mode", ["oracle", "predictor"])
    def test_interp_quantized_hybrid(mode, tiny_checkpoint):
        """The same split with the GPU side's Triton kernels (dequantizing in registers), interpreted."""
        path, loaded, _, keep, dense, _ = _split_model(tiny_checkpoint, "triton", mode,
                                                       "q4_0" if mode == "oracle" else "q8_0")
        got = loaded.model.forward_sequence(torch.tensor(PROMPT))
        if mode == "oracle":
            _close(got, dense)
        else:
            with torch.no_grad():
                want = _keep_only(quantized_reference(path), keep.float(), "reglu")(torch.tensor([PROMPT])).logits[0]
            _close(got, want)


@pytest.mark.gpu
def test_cuda_quantized_hybrid_predictor(tiny_checkpoint):
    """Hot rows quantized on CUDA (Triton), cold ones on a CPU worker: transformers with the same neurons."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0", activation="reglu")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=3)
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=1, predictor=weights), HybridConfig(),
                 loaded.fingerprint, gpu_device="cuda", workers=1)
    assert loaded.model.layers[0].ffn.hot_up.device.type == "cuda"
    assert loaded.model.device.type == "cuda" and loaded.model.dtype == torch.bfloat16
    assert isinstance(loaded.model.layers[0].attn.wqkv, QRows)
    got = loaded.model.forward_sequence(torch.tensor(PROMPT)).float().cpu()
    with torch.no_grad():
        want = _keep_only(quantized_reference(path), keep.float(), "reglu")(torch.tensor([PROMPT])).logits[0]
    _close(got, want)


def test_dense_parts_where_the_gpu_side_runs(tiny_checkpoint):
    """On a GPU the dense parts go there as quantized rows (hybrid.move_dense_parts: attention, embeddings,
    head; products through the kernels) and the FFN's input comes from them: here that layout on the CPU
    (float32 norms and activations), against transformers with the same neurons."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0", activation="reglu")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=3)
    move_dense_parts(loaded.model, torch.device("cpu"), torch.float32)
    m = loaded.model
    assert all(isinstance(w, QRows) for w in (m.layers[0].attn.wqkv, m.layers[0].attn.wo, m.embed, m.lm_head))
    assert m.dtype == torch.float32 and m._native_blocks() is None
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=1, predictor=weights),
                 HybridConfig(backend="reference"), loaded.fingerprint, gpu_device="cpu", workers=1)
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = _keep_only(quantized_reference(path), keep.float(), "reglu")(torch.tensor([PROMPT])).logits[0]
    _close(got, want)


def test_dense_parts_of_a_quantized_model_with_a_float_embedding(tiny_checkpoint):
    """GGUFs often keep token_embd in F16/F32 beside quantized matrices: the dense parts still go as a quantized
    model's do (quantized rows; norms, embeddings and activations in the GPU side's dtype), not left float32."""
    m = load_model(tiny_checkpoint("llama"), quantize="q8_0").model
    m.embed = m.embed.dequantize()  # a float embedding beside quantized matrices
    assert m.quantized
    move_dense_parts(m, torch.device("cpu"), torch.bfloat16)
    assert isinstance(m.layers[0].attn.wqkv, QRows)
    assert m.embed.dtype == m.final_norm.weight.dtype == m.layers[0].attn_norm.weight.dtype == torch.bfloat16
    assert m.dtype == torch.bfloat16
    # only the FFNs quantized (attention and embeddings float): still a quantized model, and moved as one
    m = load_model(tiny_checkpoint("llama"), quantize="q8_0").model
    m.embed = m.lm_head = m.embed.dequantize()
    for layer in m.layers:
        layer.attn.wqkv, layer.attn.wo = layer.attn.wqkv.dequantize(), layer.attn.wo.dequantize()
    assert m.quantized and not load_model(tiny_checkpoint("llama"), dtype="float32").model.quantized
    move_dense_parts(m, torch.device("cpu"), torch.bfloat16)
    assert m.layers[0].attn.wqkv.dtype == m.final_norm.weight.dtype == m.dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_command_line_route(tiny_checkpoint, tmp_path):
    """`--device cuda --plan P` on a quantized model: it loads on the CPU, hot rows go to CUDA quantized, the
    dense parts as bfloat16, cold rows stay in CPU blocks; a greedy generation runs and the counters move."""
    import argparse

    from hotcold.engine import commands_perplexity
    from hotcold.engine.commands_generate import load_from_args
    from hotcold.engine.plan import save_plan

    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0", activation="reglu")
    save_plan(make_plan(loaded, "random", seed=1), tmp_path / "plan")
    parser = argparse.ArgumentParser()
    commands_perplexity.add_arguments(parser)
    args = parser.parse_args(["--model", str(path), "--quantize", "q8_0", "--activation", "reglu", "--plan",
                              str(tmp_path / "plan"), "--sparsity", "oracle", "--device", "cuda", "--text", "x"])
    routed = load_from_args(args)
    ffn = routed.model.layers[0].ffn
    assert isinstance(ffn, QuantHybridFFN) and ffn.hot_up.device.type == "cuda"
    assert ffn.cold_gate_up.data.device.type == "cpu" and routed.model.device.type == "cuda"
    got = routed.model.forward_sequence(torch.tensor(PROMPT)).float().cpu()
    _close(got, loaded.model.forward_sequence(torch.tensor(PROMPT)))  # threshold 0: the dense model
    assert 0 < routed.model.ffn_counters.hot_share < 1
