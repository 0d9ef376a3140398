"""Input sparsity (engine/input_sparsity.py) end to end on tiny models, against transformers with the same
inputs masked by forward pre-hooks on its projections (q/k/v, o, gate/up, down): the quantized model through
the one-call native block over input-major matrices, the per-op path, and a float model."""

from __future__ import annotations

import pytest
import torch
from test_quantized_engine import PROMPT, assert_batch_independent, quantized_reference
from tiny_models import reference_model

from hotcold.engine import input_sparsity
from hotcold.engine.cache import KVCache
from hotcold.engine.input_sparsity import SparseInput
from hotcold.engine.loader import load_model
from hotcold.engine.model import StepBatch
from hotcold.kernels.input_sparse import InputMajor

BOUND = 0.06  # of the logits' scale: int8 activations in the dense products (test_quantized_engine)
HF_SITES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}


def _thresholds(model, share: float) -> list[dict[str, float]]:
    """Per layer and site, the `share` quantile of the site's input magnitudes on PROMPT (observed by hotcold
    on its dense per-op path): thresholds that drop about that share."""
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    saved = input_sparsity.apply_input_sparsity(
        model, [{} for _ in model.layers], input_major=False,
        observe=lambda i, site, x: seen.setdefault((i, site), []).append(x.detach().abs().flatten()))
    model.forward_sequence(torch.tensor(PROMPT))
    input_sparsity.restore(model, saved)
    return [{s: float(torch.cat(seen[(i, s)]).quantile(share)) for s in input_sparsity.SITES}
            for i in range(len(model.layers))]


def _masked_reference(ref, thresholds: list[dict[str, float]], start: int = 0):
    """transformers with every projection's input zeroed where |x| <= its layer's site threshold, at the
    positions from `start` on."""
    def hook(mod, args, t):
        x = args[0]
        keep = x.abs() > t
        keep[:, :start] = True
        return (x * keep,)

    for i, layer in enumerate(ref.model.layers):
        for name, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if name in HF_SITES:
                t = thresholds[i][HF_SITES[name]]
                module.register_forward_pre_hook(lambda mod, args, t=t: hook(mod, args, t))
    return ref


def _close(got: torch.Tensor, want: torch.Tensor, bound: float = BOUND) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= bound * scale, f"max abs error {err:.3g} > {bound:.0%} of the logits' scale {scale:.3g}"


def _decode(model, ids: list[int], steps: int) -> torch.Tensor:
    """Logits of the prompt's last token and of `steps` greedy decode steps through the KV cache."""
    cfg = model.config
    cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
    table = list(range(16))
    ids = list(ids)
    rows = [model(torch.tensor(ids), StepBatch([table], [0], [len(ids)]), cache)[-1]]
    for _ in range(steps):
        ids.append(int(rows[-1].argmax()))
        rows.append(model(torch.tensor(ids[-1:]), StepBatch([table], [len(ids) - 1], [1]), cache)[-1])
    return torch.stack(rows), ids


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_native_block_matches_transformers_with_masked_inputs(qtype, tiny_checkpoint):
    """Every site input-sparse (about 40% dropped), prompt tokens too: the native block over input-major
    matrices gives transformers' logits with the same inputs masked, and not the dense ones."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize=qtype)
    model = loaded.model
    thresholds = _thresholds(model, 0.4)
    input_sparsity.apply_input_sparsity(model, thresholds, prefill=True)
    block = model.layers[0]
    assert isinstance(block.attn.wqkv, SparseInput) and isinstance(block.attn.wqkv.weight, InputMajor)
    assert isinstance(block.ffn.down, SparseInput) and model._native_blocks() is not None
    got, ids = _decode(model, PROMPT, 6)
    reference = _q4_reference if qtype == "q4_0" else quantized_reference  # gguf's round trip of the matrices
    masked, dense_ref = _masked_reference(reference(path), thresholds), reference(path)
    with torch.no_grad():
        want = masked(torch.tensor([ids])).logits[0, len(PROMPT) - 1:]
        dense = dense_ref(torch.tensor([ids])).logits[0, len(PROMPT) - 1:]
    _close(got, want)
    assert (got - dense).abs().max() > 3 * BOUND * dense.abs().max()  # the masks did something


def _q4_reference(path):
    import gguf
    import numpy as np

    ref = reference_model(path)
    q4 = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.shape[-1] % 32 == 0:
                w = module.weight.detach().float().numpy()
                deq = gguf.quants.dequantize(gguf.quants.quantize(w, q4), q4)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(w.shape))
    return ref


def test_decode_only_by_default(tiny_checkpoint):
    """Without prefill, prompt tokens keep every input: their logits are bitwise those of the same layout
    with nothing dropped; decode tokens are sparse."""
    path = tiny_checkpoint("llama")
    sparse, keep_all = load_model(path, quantize="q8_0"), load_model(path, quantize="q8_0")
    thresholds = _thresholds(sparse.model, 0.5)
    input_sparsity.apply_input_sparsity(sparse.model, thresholds)
    input_sparsity.apply_input_sparsity(keep_all.model, [{s: 1e-30 for s in t} for t in thresholds])
    got, ids = _decode(sparse.model, PROMPT, 3)
    base, _ = _decode(keep_all.model, PROMPT, 0)
    assert torch.equal(got[0], base[0])
    with torch.no_grad():
        ref = _masked_reference(quantized_reference(path), thresholds, start=len(PROMPT))
        want = ref(torch.tensor([ids])).logits[0, len(PROMPT) - 1:]
    _close(got, want)


def _per_op_against(reference, loaded, thresholds: list[dict[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_sequence (no cache: the per-op path, every token sparse) with the thresholds, and `reference`
    (transformers) with the same inputs masked, on PROMPT."""
    input_sparsity.apply_input_sparsity(loaded.model, thresholds)
    got = loaded.model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        return got, _masked_reference(reference, thresholds)(torch.tensor([PROMPT])).logits[0]


def test_per_op_path_agrees_and_counts(tiny_checkpoint):
    """The per-op path gives the masked reference too, and counts what each site dropped."""
    path = tiny_checkpoint("llama")
    loaded = load_model(path, quantize="q8_0")
    got, want = _per_op_against(quantized_reference(path), loaded, _thresholds(loaded.model, 0.4))
    _close(got, want)
    for layer in input_sparsity.site_sparsity(loaded.model):
        assert set(layer) == set(input_sparsity.SITES)
        assert all(0.3 < v < 0.5 for v in layer.values()), layer


def test_float_model_matches_transformers(tiny_checkpoint):
    """A float checkpoint: W^T rows through the gathered axpy (down through its own down_t), fp32-exact."""
    path = tiny_checkpoint("qwen2")  # q/k/v biases: added after the masked product
    loaded = load_model(path, dtype="float32")
    got, want = _per_op_against(reference_model(path), loaded, _thresholds(loaded.model, 0.4))
    with torch.no_grad():
        dense = reference_model(path)(torch.tensor([PROMPT])).logits[0]
    _close(got, want, 1e-4)
    assert (got - dense).abs().max() > 0.05 * dense.abs().max()


def test_batch_does_not_change_results(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("qwen2"), quantize="q4_1")
    input_sparsity.apply_input_sparsity(loaded.model, _thresholds(loaded.model, 0.4))
    assert_batch_independent(loaded)


def test_restore_and_refusals(tiny_checkpoint):
    from hotcold.engine.errors import HotcoldError

    loaded = load_model(tiny_checkpoint("llama"), quantize="q8_0")
    model = loaded.model
    before = model.forward_sequence(torch.tensor(PROMPT))
    saved = input_sparsity.apply_input_sparsity(model, _thresholds(model, 0.4), input_major=False)
    assert not torch.equal(model.forward_sequence(torch.tensor(PROMPT)), before)
    input_sparsity.restore(model, saved)
    assert torch.equal(model.forward_sequence(torch.tensor(PROMPT)), before)
    with pytest.raises(HotcoldError, match="layers"):
        input_sparsity.apply_input_sparsity(model, [{}])
    with pytest.raises(HotcoldError, match="unknown input-sparsity sites"):
        input_sparsity.apply_input_sparsity(model, [{"q": 1.0}, {}])
