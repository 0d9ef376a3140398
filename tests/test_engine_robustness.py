"""What no single request may do to the engine: sampling values at the edge of what the API admits, a
request whose sampling fails, and output whose detokenization cost grows with its length."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from hotcold.engine import llm as llm_module
from hotcold.engine.errors import HotcoldError
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams, sample_token
from hotcold.engine.sequence import Sequence

LOGITS = torch.tensor([0.5, 3.0, -1.0, 2.9, 0.0])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-39), SamplingParams(temperature=1e-6, seed=1),
    SamplingParams(temperature=1.0, top_p=1e-300), SamplingParams(temperature=2.0, min_p=1.0),
], ids=["temperature-1e-39", "temperature-1e-6", "top_p-1e-300", "min_p-1"])
def test_edge_values_sample_the_most_likely_token(params):
    params.validate()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_token(LOGITS.clone(), params, gen, [], [])[0] == 1  # argmax, computed by hand


def test_penalties_that_would_overflow_are_refused():
    for bad in (1e-300, 0.0, 1e300, float("nan")):
        with pytest.raises(HotcoldError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad).validate()
    with pytest.raises(HotcoldError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("inf")}).validate()


def test_logit_bias_forces_and_forbids_tokens():
    gen = torch.Generator().manual_seed(0)
    forced = SamplingParams(temperature=0, logit_bias={4: 100.0})
    assert sample_token(LOGITS.clone(), forced, gen, [], [])[0] == 4
    forbidden = SamplingParams(temperature=1.0, logit_bias={1: -100.0, 3: -100.0})
    draws = {sample_token(LOGITS.clone(), forbidden, gen, [], [])[0] for _ in range(200)}
    assert draws and not draws & {1, 3}
    # logprobs stay the model's own, before the bias
    with_lp = SamplingParams(temperature=0, logit_bias={4: 100.0}, logprobs=0)
    _, lp = sample_token(LOGITS.clone(), with_lp, gen, [], [])
    assert lp.logprob == pytest.approx(LOGITS.log_softmax(-1)[4].item())


def test_a_failing_request_fails_alone(tiny_checkpoint, monkeypatch):
    engine = LLMEngine(load_model(tiny_checkpoint("llama"), dtype="float32"), max_num_seqs=4, max_model_len=64)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [o.new_token_ids for o in engine.stream([3, 4, 5], params, "alone")]
    real = llm_module.sample_token

    def poisoned(logits, p, *args):
        if p.seed == 666:
            raise RuntimeError("probability tensor contains nan")
        return real(logits, p, *args)

    monkeypatch.setattr(llm_module, "sample_token", poisoned)
    engine.add_request("bad", [7, 8, 9], SamplingParams(max_tokens=8, temperature=1.0, seed=666))
    engine.add_request("good", [3, 4, 5], params)
    outs: dict[str, list] = {"bad": [], "good": []}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert len(outs["bad"]) == 1 and outs["bad"][0].finish_reason == "error" and "nan" in outs["bad"][0].error
    assert [o.new_token_ids for o in outs["good"]] == alone
    assert engine.blocks.num_referenced == 0


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_model(tiny_checkpoint("llama"), dtype="float32").tokenizer


TEXT = "Grüße aus Köln! 東京は晴れ。 def f(x): return x**2  # 12345 678 — naïve café 🙂 end"


def _feed(tokenizer, ids, **params) -> tuple[str, Sequence]:
    seq = Sequence("s", [1], SamplingParams(max_tokens=len(ids), ignore_eos=True, **params), set())
    text = ""
    for t in ids:
        text += seq.append(t, tokenizer, 10**6)
        if seq.finish_reason:
            break
    return text, seq


def test_incremental_text_equals_a_whole_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    text, seq = _feed(tokenizer, ids)
    assert text == seq.text == tokenizer.backend.decode(ids)  # the tokenizers library's own whole decode


@pytest.mark.parametrize("stop", ["Köln", "晴れ", "x**2", "🙂", " end"])
def test_stop_strings_are_cut_exactly(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = tokenizer.backend.decode(ids)
    text, seq = _feed(tokenizer, ids, stop=[stop, "never there"])
    assert seq.finish_reason == "stop" and text == whole[: whole.index(stop)]


def test_the_earliest_stop_string_wins(tokenizer):
    """Two stop strings that both occur: the text ends before the one that comes first in the text, whatever
    their order in the list."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = tokenizer.backend.decode(ids)
    for stops in (["café", "Köln"], ["Köln", "café"]):
        text, seq = _feed(tokenizer, ids, stop=stops)
        assert seq.finish_reason == "stop" and text == whole[: whole.index("Köln")]


def test_held_back_tail_equals_brute_force():
    """The tail kept back (it may still grow into a stop string) against trying every length of every stop."""
    import random

    from hotcold.engine.sequence import _held_back

    rng = random.Random(0)
    for _ in range(3000):
        pending = "".join(rng.choice("abé") for _ in range(rng.randrange(0, 9)))
        stops = ["".join(rng.choice("abé") for _ in range(rng.randrange(1, 7))) for _ in range(rng.randrange(1, 4))]
        brute = max((k for s in stops for k in range(1, min(len(s) - 1, len(pending)) + 1)
                     if pending.endswith(s[:k])), default=0)
        assert _held_back(pending, stops) == brute, (pending, stops)


def test_per_token_cost_does_not_grow_with_the_output(tokenizer):
    ids = tokenizer.encode(TEXT * 60, add_special_tokens=False)[:2000]
    seq = Sequence("s", [1], SamplingParams(max_tokens=10**6, ignore_eos=True, stop=["zzz"]), set())
    costs = []
    for t in ids:
        start = time.perf_counter()
        seq.append(t, tokenizer, 10**7)
        costs.append(time.perf_counter() - start)
    # medians: one preemption or GC pause must not decide it; a cost that grows makes every late token slower
    first, last = statistics.median(costs[:200]), statistics.median(costs[-200:])
    assert last <= 3 * first + 2e-6, f"last 200 tokens {last * 1e6:.1f} us each vs first 200 {first * 1e6:.1f} us"


def test_a_forward_failure_fails_its_step_and_the_engine_goes_on(tiny_checkpoint):
    """An exception in the model itself ends that step's requests with an error (not a hang), frees their
    blocks, and the next request is served as if nothing happened."""
    import asyncio

    from hotcold.server.async_engine import AsyncEngine, Backend

    loaded = load_model(tiny_checkpoint("llama"), dtype="float32")
    engine = LLMEngine(loaded, max_num_seqs=4, max_model_len=64)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.new_token_ids for o in engine.stream([3, 4, 5], params, "ref")]
    real, calls = loaded.model.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in the forward pass")
        return real(*args, **kwargs)

    loaded.model.forward = flaky

    async def serve() -> list:
        front = AsyncEngine(lambda: Backend(engine=engine, tokenizer=loaded.tokenizer), max_in_flight=8)
        front.start(asyncio.get_running_loop())
        while not front.ready:
            await asyncio.sleep(0.01)
        try:
            group = await front.submit([("a", [3, 4, 5], params), ("b", [6, 7], params)])
            with pytest.raises(RuntimeError, match="boom"):
                async for _ in group.outputs():
                    pass
            again = await front.submit([("c", [3, 4, 5], params)])
            return [o.new_token_ids async for o in again.outputs()]
        finally:
            front.shutdown()

    assert asyncio.run(serve()) == expected
    assert calls["n"] > 3 and engine.blocks.num_referenced == 0 and not engine.has_unfinished()


def test_a_chat_template_cannot_loop_for_minutes(tokenizer):
    """A checkpoint's chat template is model input: nested range() loops (10^10 steps; the sandbox caps only
    each range) end in one error at once, while ordinary loops render as before."""
    import copy

    hostile = copy.copy(tokenizer)
    hostile.chat_template = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"
    started = time.perf_counter()
    with pytest.raises(HotcoldError, match="loops"):
        hostile.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - started < 10
    hostile.chat_template = "{% for i in range(3) %}{{ i }}{% endfor %}{{ messages[0]['content'] }}"
    assert hostile.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "012hi"
