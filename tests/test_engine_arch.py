"""Every architecture against transformers: prefill and decode logits, greedy tokens, batch invariance."""

from __future__ import annotations

import pytest
import torch
from tiny_models import KINDS, reference_model

from hotcold.engine.cache import KVCache
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.model import StepBatch
from hotcold.engine.sampling import SamplingParams

SCATTERED = [13, 2, 9, 0, 12, 7, 3, 1]  # a block table whose blocks are neither adjacent nor in order

PROMPT = list(range(3, 27))  # 24 tokens: longer than Mistral's 16-token window in the tiny config


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} > 1e-4 x logits scale {scale:.3g}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_and_greedy_match_transformers(kind, tiny_checkpoint):
    path = tiny_checkpoint(kind)
    ref = reference_model(path)
    loaded = load_model(path, dtype="float32")
    model, cfg = loaded.model, loaded.config

    # prefill, then 8 decode steps through the KV cache, each compared with transformers' full forward
    cache = KVCache(cfg.num_layers, 16, cfg.num_kv_heads, 8, cfg.head_dim, torch.float32)
    ids = list(PROMPT)
    logits = model(torch.tensor(ids), StepBatch([SCATTERED], [0], [len(ids)]), cache)
    with torch.no_grad():
        _close(logits, ref(torch.tensor([ids])).logits[0])
    for _ in range(8):
        ids.append(int(logits[-1].argmax()))
        logits = model(torch.tensor(ids[-1:]), StepBatch([SCATTERED], [len(ids) - 1], [1]), cache)
        with torch.no_grad():
            _close(logits[-1], ref(torch.tensor([ids])).logits[0, -1])

    # 32 greedy tokens identical to transformers' generate
    engine = LLMEngine(loaded, max_num_seqs=4, max_model_len=96)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ours = engine.generate([PROMPT], params)[0].output_ids
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == theirs

    # 4 prompts of different lengths batched together give the tokens each gives alone
    prompts = [PROMPT[:5], PROMPT, PROMPT[3:12], PROMPT[:1]]
    together = [s.output_ids for s in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].output_ids for p in prompts]
    assert together == alone


def test_block_tables_reach_a_device_once_per_step():
    """Every layer's attention reads the step's tables on its device: one copy per step, not one per layer
    (a pageable copy to a GPU waits for its queue)."""
    batch = StepBatch([[3, 1], [2]], [0, 5], [4, 1])
    on = batch.tables_on(torch.device("cpu"))
    assert on is batch.tables_on(torch.device("cpu")) and torch.equal(on, torch.tensor([[3, 1], [2, 0]]))


def test_chunked_prefill_matches_whole_prefill(tiny_checkpoint):
    """A prompt longer than the step's token budget is prefilled over several steps: same tokens."""
    loaded = load_model(tiny_checkpoint("mistral"), dtype="float32")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = list(range(3, 63))
    whole = LLMEngine(loaded, max_num_seqs=2, max_model_len=128).generate([prompt], params)[0].output_ids
    chunked = LLMEngine(loaded, max_num_seqs=2, max_model_len=128, max_num_batched_tokens=7)
    assert chunked.generate([prompt, prompt[:9]], params)[0].output_ids == whole


def test_sharded_checkpoint_has_an_index(tiny_checkpoint):
    path = tiny_checkpoint("llama_sharded")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) >= 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(tiny_checkpoint, dtype):
    path = tiny_checkpoint("llama")
    ref = reference_model(path)
    logits = load_model(path, dtype=dtype).model.forward_sequence(torch.tensor(PROMPT))
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    rel = ((logits - expected).norm() / expected.norm()).item()
    assert rel < 3e-2, rel
