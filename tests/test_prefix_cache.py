"""Paged KV blocks and automatic prefix caching: the block manager against a brute-force model of its
rules, and the engine with the cache on against the same engine with it off (same tokens and logprobs),
on the one-call native block (quantized) and on the per-op torch path (float32)."""

from __future__ import annotations

import pytest

from hotcold.engine.block_manager import BlockManager, chain_hash
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams
from hotcold.engine.scheduler import StepTimes

PREFIX = [5 + (i * 7) % 180 for i in range(37)]  # 9 full blocks of 4, and one token over


def test_block_manager_shares_full_prompt_blocks_and_evicts_least_recently_used():
    bm = BlockManager(num_blocks=12, block_size=4)
    a = bm.allocate(PREFIX[:10], total_tokens=12)
    assert a is not None and a.blocks == [] and a.promised == 3
    bm.grow(a, 10)
    bm.register(a, PREFIX[:10], 10)  # two full blocks hashed; the third holds 2 tokens
    assert a.hashes == [chain_hash(b"", PREFIX[:4]), chain_hash(a.hashes[0], PREFIX[4:8])]
    # a second prompt sharing 9 tokens finds the two full blocks; one sharing 3 finds none
    b = bm.allocate(PREFIX[:9] + [1, 2], total_tokens=11)
    assert b.blocks == a.blocks[:2] and all(bm.blocks[i].ref_count == 2 for i in b.blocks)
    assert bm.allocate(PREFIX[:3] + [9, 9, 9, 9, 9], total_tokens=8).blocks == []
    # the last prompt token is always computed: an 8-token prompt equal to two cached blocks reuses one
    assert len(bm.allocate(PREFIX[:8], total_tokens=9).blocks) == 1
    # same hash chain, different tokens in a block (as a collision would be): not reused
    bm.blocks[a.blocks[1]].token_ids = (0, 0, 0, 0)
    assert len(bm.allocate(PREFIX[:10], total_tokens=12).blocks) == 1


def test_block_manager_refuses_what_it_cannot_promise_and_frees_everything():
    bm = BlockManager(num_blocks=6, block_size=4)
    tables = [bm.allocate(PREFIX[:9], total_tokens=12) for _ in range(2)]
    assert bm.allocate([1, 2, 3], total_tokens=4) is None  # 6 blocks promised to two sequences
    for t in tables:
        bm.grow(t, 12)
        bm.register(t, PREFIX[:12], 12)
    bm.release(tables[0])
    assert bm.num_referenced == 3 and bm.promised == 0
    assert bm.num_referenced == sum(b.ref_count > 0 for b in bm.blocks)  # the running count, by brute force
    c = bm.allocate([1, 2, 3, 4, 5], total_tokens=8)  # takes the unhashed-first / least recently used blocks
    bm.grow(c, 8)
    bm.release(tables[1])
    bm.release(c)
    assert bm.num_referenced == 0 and bm.promised == 0 and len(bm.free) == 6


def _engine(path, quantized: bool, caching: bool, **kw) -> LLMEngine:
    loaded = load_model(path, quantize="q8_0") if quantized else load_model(path, dtype="float32")
    return LLMEngine(loaded, max_num_seqs=4, max_model_len=128, block_size=4, enable_prefix_caching=caching, **kw)


@pytest.mark.parametrize("quantized", [True, False], ids=["native-block", "per-op-float32"])
def test_cached_prefix_gives_the_same_tokens_and_logprobs(tiny_checkpoint, quantized):
    path = tiny_checkpoint("llama")
    cached, plain = _engine(path, quantized, True), _engine(path, quantized, False)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True)
    first = PREFIX + [40, 41, 42]
    second = PREFIX + [77, 78]
    outs = {}
    for name, engine in (("cached", cached), ("plain", plain)):
        list(engine.stream(first, params, "first"))
        outs[name] = list(engine.stream(second, params, "second"))
    assert outs["cached"][0].num_cached_tokens == 36 and outs["plain"][0].num_cached_tokens == 0
    tokens = {k: [o.new_token_ids[0] for o in v] for k, v in outs.items()}
    assert tokens["cached"] == tokens["plain"]
    lps = {k: [(o.logprobs[0].logprob, o.logprobs[0].top) for o in v] for k, v in outs.items()}
    if quantized:  # one native call per block, a fixed order per token: bitwise the same
        assert lps["cached"] == lps["plain"]
    else:  # torch's GEMMs may sum a 36-token chunk in another order than a 39-token one
        for (a, _), (b, _) in zip(lps["cached"], lps["plain"]):
            assert a == pytest.approx(b, abs=1e-4)
    assert cached.stats()["prefix_cache_hit_tokens"] == 36 and cached.blocks.num_referenced == 0


def test_blocks_come_back_after_finish_and_abort(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("llama"), True, True)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"r{i}", PREFIX[: 5 + 4 * i], params)
    for step in range(12):
        engine.step()
        if step % 3 == 0:
            engine.abort(f"r{step // 3}")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_referenced == 0 and engine.blocks.promised == 0


def test_a_short_request_is_not_queued_behind_a_long_prompt(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("llama"), True, False, max_num_batched_tokens=32)
    long_prompt = [(i * 13) % 190 + 3 for i in range(120)]
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=2, temperature=0))
    engine.step()  # the long prompt's first chunk
    engine.add_request("short", [3, 4, 5, 6], SamplingParams(max_tokens=2, temperature=0))
    out = engine.step()
    assert [o.request_id for o in out] == ["short"]  # its whole prompt ran in the very next step
    assert engine.scheduler.find("long").num_pending > 32


def test_step_cost_is_capped_while_others_wait(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("llama"), True, False, max_num_batched_tokens=100)
    sched = engine.scheduler
    engine.add_request("decoding", [3, 4, 5], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    engine.add_request("long", list(range(3, 103)), SamplingParams(max_tokens=1, temperature=0))
    sched.step_times = StepTimes()
    for cost, seconds in ((1, 0.002), (1, 0.002), (50, 0.052), (100, 0.102)):  # 2 ms + 1 ms per equivalent
        sched.step_times.add(cost, seconds)
    assert sched.step_times.overhead == pytest.approx(0.002) and sched.step_times.rate == pytest.approx(0.001)
    sched.max_step_seconds = 0.027  # 25 token-equivalents a step
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan][0] == ("decoding", 1)
    assert 20 <= plan[1][1] <= 24  # what the cap leaves beside the decode


def test_prompt_logprobs_come_from_the_chunked_prefill(tiny_checkpoint):
    import torch
    from tiny_models import reference_model

    path = tiny_checkpoint("llama")
    engine = _engine(path, False, True, max_num_batched_tokens=16)  # the prompt spans three chunks
    prompt = PREFIX
    list(engine.stream(prompt, SamplingParams(max_tokens=2, temperature=0), "warm"))  # would be a cache hit
    out = list(engine.stream(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2), "score"))
    assert len(out) == 1 and out[0].finished and out[0].new_token_ids == []
    scored = out[0].prompt_logprobs
    with torch.no_grad():
        want = reference_model(path)(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    assert scored[0] is None and len(scored) == len(prompt)
    for t in range(1, len(prompt)):
        assert scored[t].token_id == prompt[t]
        assert scored[t].logprob == pytest.approx(want[t - 1, prompt[t]].item(), abs=1e-4)
        assert set(scored[t].top) == set(want[t - 1].topk(2).indices.tolist())
