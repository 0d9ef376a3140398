"""Quantized models end to end: `--quantize` checkpoints and the one-call native block, against transformers.

The reference is transformers with every matrix replaced by gguf's own Q8_0 round trip of it (gguf.quants,
not our code), so what remains is the error of quantizing activations to int8 per 32 values: 1-4% of the
logits' scale on these random tiny models (measured), so the bound is 6%.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_checkpoint, reference_model

from hotcold.engine.cache import KVCache
from hotcold.engine.layers import QuantFFN
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.model import StepBatch
from hotcold.engine.sampling import SamplingParams
from hotcold.kernels.quant import QuantTensor

SCATTERED = [13, 2, 9, 0, 12, 7, 3, 1]  # a block table whose blocks are neither adjacent nor in order

PROMPT = list(range(3, 27))  # 24 tokens: past Mistral's 16-token window in the tiny config
# kind -> whether every matrix is quantizable (dimensions in whole 32-blocks), so every block is one native call;
# the others keep their odd-sized FFN in floats and run the per-op path
KINDS = {"llama": True, "mistral": True, "qwen2": True, "llama3_rope": True, "llama_sharded": True,
         "llama_untied_bias": False, "relu_llama": False, "llama_all_biases": True}
# kinds of this file only: (tiny_models kind, config overrides). llama_all_biases: q/k/v/o and gate/up/down
# biases with an FFN in whole 32-blocks, so the one native call adds every bias (no other quantizable kind
# has an o_proj bias)
LOCAL_KINDS = {"llama_all_biases": ("llama_untied_bias", {"intermediate_size": 160})}


def _q8_round_trip(w: torch.Tensor) -> torch.Tensor:
    q8 = gguf.GGMLQuantizationType.Q8_0
    deq = gguf.quants.dequantize(gguf.quants.quantize(w.detach().float().numpy(), q8), q8)
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(w.shape)


@torch.no_grad()
def quantized_reference(path):
    ref = reference_model(path)
    for module in ref.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.shape[-1] % 32 == 0:
            module.weight.copy_(_q8_round_trip(module.weight))
    return ref


@pytest.mark.parametrize("kind", list(KINDS))
def test_native_block_matches_transformers(kind, tiny_checkpoint, tmp_path):
    path = make_tiny_checkpoint(LOCAL_KINDS[kind][0], tmp_path / kind, **LOCAL_KINDS[kind][1]) if (
        kind in LOCAL_KINDS) else tiny_checkpoint(kind)
    loaded = load_model(path, quantize="q8_0")
    model, cfg = loaded.model, loaded.config
    assert isinstance(model.layers[0].attn.wqkv, QuantTensor) and isinstance(model.lm_head, QuantTensor)
    assert isinstance(model.layers[0].ffn, QuantFFN) == KINDS[kind]
    assert (model._native_blocks() is not None) == KINDS[kind]
    ref = quantized_reference(path)
    cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
    ids = list(PROMPT)
    logits = model(torch.tensor(ids), StepBatch([SCATTERED], [0], [len(ids)]), cache)
    for step in range(9):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0, -logits.shape[0]:]
        err, scale = (logits - want).abs().max().item(), want.abs().max().item()
        assert err <= 0.06 * scale, f"step {step}: max abs error {err:.3g} > 6% of logits scale {scale:.3g}"
        ids.append(int(logits[-1].argmax()))
        logits = model(torch.tensor(ids[-1:]), StepBatch([SCATTERED], [len(ids) - 1], [1]), cache)


def test_torch_path_and_native_block_agree(tiny_checkpoint, monkeypatch):
    """The same quantized model through the one-call block and through the per-op path (long steps), both
    with integer products (the calibrated crossover would send the per-op path to dequantized GEMMs)."""
    from hotcold.engine import model as model_module
    from hotcold.kernels import quant

    monkeypatch.setattr(quant, "_native_tokens", lambda: 1 << 20)
    loaded = load_model(tiny_checkpoint("llama"), quantize="q4_0")
    model, cfg = loaded.model, loaded.config
    outs = []
    for native in (True, False):
        monkeypatch.setattr(model_module, "NATIVE_BLOCKS", native)
        cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
        outs.append(model(torch.tensor(PROMPT), StepBatch([SCATTERED], [0], [len(PROMPT)]), cache))
    scale = outs[1].abs().max().item()
    print("native vs per-op", (outs[0] - outs[1]).abs().max().item() / scale)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-3 * scale


def assert_batch_independent(loaded, max_tokens: int = 12) -> None:
    """Greedy decoding of three prompts together (one long: its prefill shares steps with the others'
    decoding) gives exactly what each gives alone."""
    prompts = [PROMPT[:7], PROMPT[3:20], (PROMPT * 5)[:110]]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    together = LLMEngine(loaded, max_num_seqs=4, max_model_len=128).generate(prompts, params)
    for prompt, seq in zip(prompts, together):
        alone = LLMEngine(loaded, max_num_seqs=1, max_model_len=128).generate([prompt], params)[0]
        assert alone.output_ids == seq.output_ids


def test_batch_does_not_change_results(tiny_checkpoint):
    assert_batch_independent(load_model(tiny_checkpoint("qwen2"), quantize="q4_1"))


def test_quantize_flag_errors(tiny_checkpoint):
    from hotcold.engine.errors import HotcoldError

    with pytest.raises(HotcoldError, match="unknown --quantize"):
        load_model(tiny_checkpoint("llama"), quantize="q3_x")


def test_gguf_with_a_type_nothing_runs_names_it(tmp_path):
    """Q8_1 (an activation format that gguf cannot dequantize) in a weight: one clear error naming it."""
    from hotcold.engine.errors import HotcoldError
    from hotcold.engine.gguf_weights import GGUFReader

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 2 * 40), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(HotcoldError, match="Q8_1.*convert the model"):
        GGUFReader(path).get_quantized("layers.0.q.weight")


def test_truncated_gguf_is_one_clean_error(tmp_path, default_model_path):
    from hotcold.engine.errors import HotcoldError

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[: 40_000_000])
    with pytest.raises(HotcoldError, match="cannot read GGUF"):
        load_model(cut)


def test_chunked_prefill_gives_the_same_tokens(tiny_checkpoint):
    """A long prompt prefilled in chunks of 16 tokens (steps whose chunks have no logits to compute, the
    case that once crashed the quantized head) decodes exactly as when prefilled at once."""
    loaded = load_model(tiny_checkpoint("llama"), quantize="q8_0")
    prompt = (PROMPT * 5)[:100]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    whole = LLMEngine(loaded, max_num_seqs=1, max_model_len=128).generate([prompt], params)[0]
    chunked = LLMEngine(loaded, max_num_seqs=1, max_model_len=128, max_num_batched_tokens=16).generate(
        [prompt], params)[0]
    assert chunked.output_ids == whole.output_ids


def test_memory_report_counts_the_files_bytes(default_model_path):
    """The start-up log's model bytes: a GGUF kept in its blocks holds what the file holds (within its
    metadata and tokenizer), each tensor counted once however many modules share it."""
    import re

    from hotcold.engine.loader import memory_report

    report = memory_report(load_model(default_model_path).model)
    held = float(re.search(r"for (\d+) MB of model tensors", report).group(1)) * 1e6
    assert 0.9 * default_model_path.stat().st_size <= held <= default_model_path.stat().st_size
