"""A plan over quantized weights (engine/quant_sparse.py): the sparse FFN on the checkpoint's blocks, against
transformers with gguf's own Q8_0 round trip of every matrix (test_quantized_engine's reference), with the
neurons the plan switches off zeroed there too."""

from __future__ import annotations

import types

import pytest
import torch
from test_hybrid import make_plan
from test_quantized_engine import PROMPT, assert_batch_independent, quantized_reference
from tiny_models import fixed_set_predictor

from hotcold.engine.hybrid import HybridConfig, apply_hybrid
from hotcold.engine.loader import load_model
from hotcold.engine.quant_sparse import QuantSparseFFN

ORACLE = HybridConfig(mode="oracle", max_sparse_density=1.0)  # every layer sparse, whatever pays here
PREDICTOR = HybridConfig(mode="predictor", max_sparse_density=1.0)
BOUND = 0.06  # of the logits' scale: int8 activations (test_quantized_engine) plus down_t's second rounding


def _keep_only(ref, keep: torch.Tensor | None, act: str):
    """transformers' Llama MLPs as act(gate) * up with only `keep` neurons (None: all)."""
    def forward(mlp, x):
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        h = (torch.relu(g) * u) if act == "reglu" else (torch.relu(g) * torch.relu(u))
        return mlp.down_proj(h if keep is None else h * keep)

    for layer in ref.model.layers:
        layer.mlp.forward = types.MethodType(forward, layer.mlp)
    return ref


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= BOUND * scale, f"max abs error {err:.3g} > {BOUND:.0%} of the logits' scale {scale:.3g}"


@pytest.mark.parametrize("activation,qtype", [("reglu", "q8_0"), ("drelu", "q4_1")])
def test_oracle_at_threshold_zero_is_the_dense_model(activation, qtype, tiny_checkpoint):
    """Threshold 0 skips exactly the neurons whose activation is 0: the result is the dense model's."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize=qtype, activation=activation)
    dense = loaded.model.forward_sequence(torch.tensor(PROMPT))
    down_bytes = [layer.ffn.down.nbytes for layer in loaded.model.layers]
    apply_hybrid(loaded.model, make_plan(loaded, "random"), ORACLE, loaded.fingerprint)
    assert all(isinstance(layer.ffn, QuantSparseFFN) for layer in loaded.model.layers)
    # down held once, as the file's blocks rearranged (no neuron-major re-quantized copy)
    assert [layer.ffn.down_t for layer in loaded.model.layers] == [None] * len(down_bytes)
    assert [layer.ffn.down.nbytes for layer in loaded.model.layers] == down_bytes
    sparse = loaded.model.forward_sequence(torch.tensor(PROMPT))
    _close(sparse, dense)
    if qtype == "q8_0":
        with torch.no_grad():
            want = _keep_only(quantized_reference(path), None, activation)(torch.tensor([PROMPT])).logits[0]
        _close(sparse, want)
    assert 0 < loaded.model.ffn_counters.sparsity < 1  # the zeros really were skipped


def test_predictor_mask_is_what_gets_computed(tiny_checkpoint):
    """A predictor that always picks a known neuron set: transformers with the other neurons zeroed."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0", activation="reglu")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=3)
    apply_hybrid(loaded.model, make_plan(loaded, "random", predictor=weights), PREDICTOR,
                 loaded.fingerprint)
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = _keep_only(quantized_reference(path), keep.float(), "reglu")(torch.tensor([PROMPT])).logits[0]
        dense = _keep_only(quantized_reference(path), None, "reglu")(torch.tensor([PROMPT])).logits[0]
    _close(got, want)
    assert (got - dense).abs().max() > BOUND * dense.abs().max()  # the mask changed the result
    assert loaded.model.ffn_counters.sparsity == pytest.approx(1 - keep.float().mean().item(), abs=1e-6)


def test_a_token_does_not_depend_on_its_batch(tiny_checkpoint):
    """Greedy decoding with the plan: prompts together (one long prefill sharing steps with the others'
    decoding) give exactly what each gives alone."""
    loaded = load_model(tiny_checkpoint("llama"), quantize="q4_0", activation="reglu")
    apply_hybrid(loaded.model, make_plan(loaded, "random"), ORACLE, loaded.fingerprint)
    assert_batch_independent(loaded, max_tokens=10)


def test_layers_expected_too_dense_stay_dense(tiny_checkpoint):
    """A layer whose plan expects more neurons active than the sparse path pays for keeps its dense FFN (and the
    one-call block); the others turn sparse."""
    from hotcold.engine.layers import QuantFFN

    loaded = load_model(tiny_checkpoint("llama"), quantize="q8_0", activation="reglu")
    plan = make_plan(loaded, "random")
    plan.layers[0].sparsity, plan.layers[1].sparsity = 0.9, 0.2  # oracle mode: 10% and 80% expected active
    apply_hybrid(loaded.model, plan, HybridConfig(mode="oracle", max_sparse_density=0.5), loaded.fingerprint)
    assert isinstance(loaded.model.layers[0].ffn, QuantSparseFFN)
    assert isinstance(loaded.model.layers[1].ffn, QuantFFN)
    blocks = loaded.model._native_blocks()
    assert blocks[0].gate_up is None and blocks[1].gate_up is not None
