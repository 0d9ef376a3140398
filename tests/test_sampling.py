"""The sampler: seeded reproducibility, top-k=1 is greedy, filters never leak, stop strings, penalties."""

from __future__ import annotations

import pytest
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams, sample_token


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return LLMEngine(load_model(tiny_checkpoint("llama"), dtype="float32"), max_num_seqs=4, max_model_len=128)


def _outputs(engine, params, prompts=([3, 4, 5, 6],)):
    return [s.output_ids for s in engine.generate([list(p) for p in prompts], params)]


def test_seeded_sampling_is_reproducible_and_batch_invariant(engine):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    alone = _outputs(engine, params)[0]
    assert _outputs(engine, params)[0] == alone
    crowd = _outputs(engine, params, prompts=([9, 9, 9], [3, 4, 5, 6], [7]))
    assert crowd[1] == alone
    other = _outputs(engine, SamplingParams(max_tokens=24, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert other != alone


def test_top_k_one_equals_greedy(engine):
    greedy = _outputs(engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    topk1 = _outputs(engine, SamplingParams(max_tokens=20, temperature=1.3, top_k=1, seed=3, ignore_eos=True))
    assert greedy == topk1


def _brute_force_set(logits: torch.Tensor, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> set[int]:
    """The allowed tokens, computed by walking the sorted distribution in float64."""
    probs = logits.double().softmax(-1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    if top_k:
        order = order[:top_k]
    kept, cum = [], 0.0
    for i in order:
        if cum >= top_p:
            break
        kept.append(i)
        cum += probs[i].item()
    pmax = probs.max().item()
    return {i for i in kept if probs[i].item() >= min_p * pmax}


@pytest.mark.parametrize("top_p,min_p,top_k", [(0.5, 0.0, 0), (0.9, 0.0, 0), (1.0, 0.2, 0), (0.8, 0.05, 5)])
def test_filters_never_sample_outside_their_set(top_p, min_p, top_k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen) * 2
    allowed = _brute_force_set(logits, top_p, min_p, top_k)
    params = SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p, top_k=top_k)
    seen = {sample_token(logits.clone(), params, gen, [], [])[0] for _ in range(400)}
    assert seen <= allowed
    assert len(seen) > 1 or len(allowed) == 1


def test_repetition_and_frequency_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    params = SamplingParams(temperature=0, repetition_penalty=5.0)
    assert sample_token(logits.clone(), params, None, [0], [])[0] == 2  # 2.0 / 5 = 0.4 < 0.5
    params = SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=0.0)
    assert sample_token(logits.clone(), params, None, [], [0, 0])[0] == 2  # 2 - 2*2 = -2


def test_logprobs_are_the_models(engine):
    out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True))
    assert len(out[0].output_ids) == 3
    logits = engine.model.forward_sequence(torch.tensor([3, 4, 5]))[-1].double().log_softmax(-1)
    params = SamplingParams(temperature=0, logprobs=3)
    token, lp = sample_token(engine.model.forward_sequence(torch.tensor([3, 4, 5]))[-1], params, None, [], [])
    assert token == out[0].output_ids[0]
    assert lp.logprob == pytest.approx(logits[token].item(), abs=1e-5)
    assert set(lp.top) == set(logits.topk(3).indices.tolist())


def test_stop_strings_cut_the_text_exactly(engine):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full_ids = engine.generate([[3, 4, 5, 6]], params)[0].output_ids
    full = engine.tokenizer.decode(full_ids)
    stop = full[10:13]
    assert stop and full.find(stop) >= 0
    expected = full[: full.find(stop)]
    pieces = list(engine.stream([3, 4, 5, 6], SamplingParams(max_tokens=40, temperature=0, stop=[stop],
                                                              ignore_eos=True), request_id="s"))
    assert "".join(p.new_text for p in pieces) == expected
    assert pieces[-1].finish_reason == "stop"


def test_max_tokens_and_eos_finish_reasons(engine):
    out = list(engine.stream([3, 4], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), request_id="m"))
    assert [o.finished for o in out] == [False] * 4 + [True]
    assert out[-1].finish_reason == "length" and out[-1].num_output_tokens == 5
    first = out[0].new_token_ids[0]
    stopped = list(engine.stream([3, 4], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[first]),
                                 request_id="e"))
    assert len(stopped) == 1 and stopped[0].finish_reason == "stop" and stopped[0].new_text == ""


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(min_p=2),
                                 dict(logprobs=50), dict(repetition_penalty=0)])
def test_invalid_parameters_are_refused(engine, bad):
    with pytest.raises(HotcoldError):
        engine.add_request("bad", [3, 4], SamplingParams(**bad))


def test_too_long_and_empty_prompts_are_refused(engine):
    with pytest.raises(HotcoldError, match="maximum context length"):
        engine.add_request("long", [3] * 120, SamplingParams(max_tokens=20))
    with pytest.raises(HotcoldError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(HotcoldError, match="token ids"):
        engine.add_request("oov", [10**6], SamplingParams())
    assert not engine.has_unfinished()
