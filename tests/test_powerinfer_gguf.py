"""PowerInfer's GGUF variant (magic PWRI, `ffn_down_t`, f16 predictors `blk.N.fc1` / `fc2`,
`powerinfer.sparse_threshold`): loaded as it is, run exactly like the checkpoint it was written from, and
imported as a plan whose predictors decide what runs. Reference: transformers on that checkpoint (a ReLU
Llama, i.e. ReGLU, as PowerInfer's sparse FFN runs a llama file), with the predictors' masks applied to its
MLPs from the residual before the FFN norm (PowerInfer's `ffn_inp`)."""

from __future__ import annotations

import pytest
import torch
from test_quantized_engine import PROMPT, quantized_reference
from tiny_gguf import write_llama_gguf
from tiny_models import make_tiny_checkpoint, reference_model

from hotcold.engine.hybrid import HybridConfig, apply_hybrid
from hotcold.engine.layers import QuantFFN
from hotcold.engine.loader import load_model
from hotcold.profiler.import_plan import build_import_plan, read_predictors

THRESHOLD = 0.25
RANK = 32


@pytest.fixture(scope="module")
def relu_llama(tmp_path_factory):
    """A tiny ReLU Llama checkpoint and its random predictors (rounded to f16, as the file stores them)."""
    root = tmp_path_factory.mktemp("powerinfer")
    folder = make_tiny_checkpoint("llama", root / "hf", hidden_act="relu", tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(11)
    preds = {i: ((torch.randn(RANK, 64, generator=gen) * 0.3).half().float(),
                 (torch.randn(128, RANK, generator=gen) * 0.3).half().float()) for i in range(2)}
    return root, folder, preds


def _gguf(relu_llama, qtype: str):
    root, folder, preds = relu_llama
    path = root / f"model-{qtype}.powerinfer.gguf"
    if not path.exists():
        write_llama_gguf(folder, path, qtype=qtype, predictors=preds, sparse_threshold=THRESHOLD)
    return path


def _masked_reference(folder, preds):
    """transformers with each MLP keeping the neurons whose predictor logit on the residual is >= THRESHOLD."""
    ref = reference_model(folder)
    for i, layer in enumerate(ref.model.layers):
        seen = {}
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(r=args[0]))
        fc1, fc2 = preds[i]

        def forward(x, mlp=layer.mlp, seen=seen, fc1=fc1, fc2=fc2):
            keep = (torch.relu(seen["r"] @ fc1.T) @ fc2.T >= THRESHOLD).float()
            return mlp.down_proj(torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x) * keep)

        layer.mlp.forward = forward
    return ref


def test_powerinfer_gguf_runs_like_its_checkpoint(relu_llama):
    _, folder, _ = relu_llama
    loaded = load_model(_gguf(relu_llama, "F32"), dtype="float32")
    assert loaded.config.activation == "reglu"  # a PowerInfer llama file is ReluLLaMA-style
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = reference_model(folder)(torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_quantized_powerinfer_gguf_keeps_its_down_t_blocks(relu_llama):
    """Q8_0 file: down_t is used as stored (no re-quantization, no second copy as down)."""
    _, folder, _ = relu_llama
    path = _gguf(relu_llama, "Q8_0")
    loaded = load_model(path)
    ffn = loaded.model.layers[0].ffn
    assert isinstance(ffn, QuantFFN) and ffn.down is None and ffn.down_t.qtype == "Q8_0"
    raw = _raw_tensor(path, "blk.0.ffn_down_t.weight")
    assert torch.equal(ffn.down_t.data, torch.from_numpy(raw.copy()))
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = quantized_reference(folder)(torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max() <= 0.06 * want.abs().max()


def _raw_tensor(path, name):
    """A tensor's bytes read past the PWRI magic (gguf-py refuses the file as it is)."""
    import gguf
    import numpy as np

    data = bytearray(path.read_bytes())
    data[:4] = b"GGUF"
    copy = path.with_suffix(".as-gguf")
    copy.write_bytes(bytes(data))
    tensor = next(t for t in gguf.GGUFReader(str(copy)).tensors if t.name == name)
    return np.asarray(tensor.data)


def test_imported_predictors_decide_what_runs(relu_llama):
    """`hotcold plan import` on the file: its predictors (f16 values, threshold from the metadata, residual
    input, logit rule) and a run with them equal to transformers masked by the same predictors."""
    _, folder, preds = relu_llama
    path = _gguf(relu_llama, "F32")  # matrices in f32 (the reference's own weights), predictors f16 as always
    imported = read_predictors(path)
    assert imported.threshold == pytest.approx(THRESHOLD) and sorted(imported.weights) == [0, 1]
    assert torch.equal(imported.weights[1]["w1"], preds[1][0]) and torch.equal(imported.weights[1]["w2"], preds[1][1])
    loaded = load_model(path, dtype="float32")
    plan = build_import_plan(loaded, imported, [PROMPT], gpu_memory=0)
    assert plan.layers[0].predictor.rule == "logit" and plan.layers[0].predictor.input == "residual"
    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", placement="cpu"), loaded.fingerprint)
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        want = _masked_reference(folder, preds)(torch.tensor([PROMPT])).logits[0]
        dense = reference_model(folder)(torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - dense).abs().max() > 1e-2 * dense.abs().max()  # the masks changed the result
    sparsity = loaded.model.ffn_counters.sparsity
    assert 0.2 < sparsity < 0.9

    # the same plan on the quantized file: the sparse path over its blocks, predictors through int8 kernels
    qpath = _gguf(relu_llama, "Q8_0")  # a plan is bound to its file: import it from the Q8_0 one
    qplan = build_import_plan(load_model(qpath, dtype="float32"), read_predictors(qpath), [PROMPT], gpu_memory=0)
    quantized = load_model(qpath)
    apply_hybrid(quantized.model, qplan, HybridConfig(mode="predictor", max_sparse_density=1.0), quantized.fingerprint)
    quantized.model.forward_sequence(torch.tensor(PROMPT))
    assert quantized.model.ffn_counters.sparsity == pytest.approx(sparsity, abs=0.03)
