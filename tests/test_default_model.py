"""The default model (SmolLM2-135M-Instruct GGUF): tensors, logits and tokenizer against gguf and transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams

SCATTERED = [13, 2, 9, 0, 12, 7, 3, 1]  # a block table whose blocks are neither adjacent nor in order

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ours(default_model_path):
    return load_model(default_model_path, dtype="float32")


@pytest.fixture(scope="module")
def theirs(default_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_model_path.parent, default_model_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_tensors_equal_gguf_dequantize(ours, default_model_path):
    reader = gguf.GGUFReader(str(default_model_path))
    raw = {t.name: t for t in reader.tensors}

    def deq(name):
        t = raw[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    model = ours.model
    assert torch.equal(model.embed, deq("token_embd.weight"))
    for i in (0, 17, 29):
        ffn = model.layers[i].ffn
        assert torch.equal(ffn.gate, deq(f"blk.{i}.ffn_gate.weight"))
        assert torch.equal(ffn.up, deq(f"blk.{i}.ffn_up.weight"))
        assert torch.equal(ffn.down_t, deq(f"blk.{i}.ffn_down.weight").T)
        assert torch.equal(model.layers[i].attn.wo, deq(f"blk.{i}.attn_output.weight"))
        assert torch.equal(model.layers[i].attn_norm.weight, deq(f"blk.{i}.attn_norm.weight"))


def test_qk_rows_match_transformers_unpermutation(ours, theirs):
    ref = theirs[0].model.layers[3].self_attn
    wqkv = ours.model.layers[3].attn.wqkv
    expected = torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight])
    assert torch.equal(wqkv, expected)


def test_tokenizer_and_logits_match_transformers(ours, theirs):
    model, tok = theirs
    ids = ours.tokenizer.encode(PROMPT)
    assert ids == tok(PROMPT)["input_ids"]
    text = "Numbers 12345, code `x = f(y)`, émigré naïve — and <|im_start|> specials."
    assert ours.tokenizer.encode(text) == tok(text)["input_ids"]
    logits = ours.model.forward_sequence(torch.tensor(ids))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_greedy_says_paris(ours):
    engine = LLMEngine(ours, max_num_seqs=1, max_model_len=64)
    out = engine.generate([ours.tokenizer.encode(PROMPT)], SamplingParams(max_tokens=3, temperature=0))[0]
    assert ours.tokenizer.decode(out.output_ids).startswith(" Paris")


def test_chat_template_from_gguf(ours, theirs):
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.tokenizer.apply_chat_template(messages) == theirs[1].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def blocks(default_model_path):
    """The default model as `hotcold serve` loads it: GGUF blocks kept, integer dot products."""
    return load_model(default_model_path)


def test_gguf_blocks_kept_and_logits_near_transformers(blocks, theirs, default_model_path):
    from hotcold.engine.layers import QuantFFN
    from hotcold.kernels.quant import QuantTensor

    model = blocks.model
    assert isinstance(model.embed, QuantTensor) and model.embed.qtype == "Q8_0" and model.lm_head is model.embed
    assert isinstance(model.layers[0].ffn, QuantFFN) and model.layers[0].ffn.down.qtype == "Q4_1"
    assert model._native_blocks() is not None
    held = model.embed.nbytes + sum(t.nbytes for b in model.layers for t in (b.attn.wqkv, b.attn.wo,
                                                                            b.ffn.gate_up, b.ffn.down))
    assert held <= default_model_path.stat().st_size  # nothing dequantized: about the file's size
    ids = blocks.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = theirs[0](torch.tensor([ids])).logits[0]
    from hotcold.engine.cache import KVCache
    from hotcold.engine.model import StepBatch

    cfg = blocks.config
    cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
    logits = model(torch.tensor(ids), StepBatch([SCATTERED], [0], [len(ids)]), cache)
    # int8 activations (per 32 values, as llama.cpp), in the head too (its fixed per-token order), move the
    # logits by ~5% of their scale here (2.5% with a float head)
    assert (logits - expected).abs().max().item() <= 0.065 * expected.abs().max().item()
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_greedy_says_paris_on_gguf_blocks(blocks):
    engine = LLMEngine(blocks, max_num_seqs=1, max_model_len=64)
    out = engine.generate([blocks.tokenizer.encode(PROMPT)], SamplingParams(max_tokens=3, temperature=0))[0]
    assert blocks.tokenizer.decode(out.output_ids).startswith(" Paris")
