"""The sampler: seeded reproducibility, top-k=1 is greedy, filters never leak, stop strings, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.sampling import SamplingParams, apply_penalties, filter_logits, sample_token


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


def _allowed_set(logits: torch.Tensor, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> set[int]:
    """The allowed tokens from the definitions, walking the sorted distribution in float64: top-k keeps the k
    largest; top-p keeps the smallest prefix of the (top-k renormalized) sorted probabilities whose sum reaches
    top_p, the token that crosses included (HF, vLLM); min-p keeps p >= min_p * p_max."""
    probs = logits.double().softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        order = order[:top_k]
    mass = sum(probs[i] for i in order)
    kept, cum = [], 0.0
    for i in order:
        kept.append(i)
        cum += probs[i] / mass
        if top_p < 1.0:
            assert abs(cum - top_p) > 1e-4, "a sum this close to top_p is a float32 coin toss: pick other logits"
            if cum >= top_p:
                break
    return {i for i in kept if probs[i] >= min_p * probs[order[0]]}


@pytest.mark.parametrize("top_p,min_p,top_k", [(0.5, 0.0, 0), (0.9, 0.0, 0), (1.0, 0.2, 0), (0.8, 0.05, 5),
                                               (1.0, 0.0, 7), (0.7, 0.0, 12)])
def test_filters_sample_exactly_their_set(top_p, min_p, top_k):
    """Never a token outside the set, and every token inside it (a top-p that drops the crossing token, or a
    top-k that keeps k-1, samples a strict subset)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen)
    allowed = _allowed_set(logits, top_p, min_p, top_k)
    params = SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p, top_k=top_k)
    support = set(torch.nonzero(filter_logits(logits.clone(), params).softmax(-1)).flatten().tolist())
    assert support == allowed
    probs = logits.double().softmax(-1)
    rarest = min(probs[i].item() for i in allowed) / sum(probs[i].item() for i in allowed)
    assert len(allowed) > 1, "a single allowed token shows nothing: pick other logits"
    draws = math.ceil(math.log(1e-9 / len(allowed)) / math.log1p(-rarest))  # P(an allowed token unseen) < 1e-9
    assert draws <= 5000, "the rarest allowed token is too rare for a fast test: pick other logits"
    seen = {sample_token(logits.clone(), params, gen, [], [])[0] for _ in range(draws)}
    assert seen == allowed


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_draws_match_float64_softmax(temperature):
    """Seeded draws at temperature T follow softmax(logits / T), checked per token within 5 standard errors."""
    logits = [1.5, 0.7, 0.0, -0.4, -1.2]
    expected = torch.tensor(logits, dtype=torch.float64).div(temperature).softmax(-1)
    params = SamplingParams(temperature=temperature)
    gen = torch.Generator().manual_seed(1234)
    draws = 10000
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for _ in range(draws):
        counts[sample_token(torch.tensor(logits), params, gen, [], [])[0]] += 1
    bound = 5 * (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= bound).all(), (counts / draws, expected)


def test_repetition_and_frequency_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    params = SamplingParams(temperature=0, repetition_penalty=5.0)
    assert sample_token(logits.clone(), params, None, [0], [])[0] == 2  # 2.0 / 5 = 0.4 < 0.5
    params = SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=0.0)
    assert sample_token(logits.clone(), params, None, [], [0, 0])[0] == 2  # 2 - 2*2 = -2


def _penalized(logits: list[float], rep: float, freq: float, pres: float, prompt: list[int],
               output: list[int]) -> list[float]:
    """The penalty formulas written out in float64, as vLLM applies them: first repetition over every token seen
    in the prompt or the output (positive logits divided by it, negative multiplied), then frequency (times
    the count) and presence (once) over the output's tokens only."""
    out = []
    for token, x in enumerate(logits):
        if token in prompt or token in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(token)
        out.append(x - freq * count - pres * (count > 0))
    return out


@pytest.mark.parametrize("rep,freq,pres", [(1.7, 0.0, 0.0), (0.6, 0.0, 0.0), (1.0, 0.0, 0.8), (1.0, 0.9, 0.0),
                                           (1.0, -0.5, -1.3), (1.7, 0.9, 0.8), (2.5, -0.3, 1.1)])
def test_penalties_follow_the_formulas(rep, freq, pres):
    """Hand-built logits, positive and negative; token 1 and 6 only in the prompt (while the output is not
    empty), 2 in both, 3 and 4 in the output (4 three times), 0, 5 and 7 nowhere."""
    logits = [1.2, 2.0, -0.8, -1.5, 0.9, 3.0, -2.2, 0.4]
    prompt, output = [1, 2, 6, 1], [3, 4, 2, 4, 4]
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = apply_penalties(torch.tensor(logits), params, prompt, output)
    assert got.tolist() == pytest.approx(_penalized(logits, rep, freq, pres, prompt, output), abs=1e-6)


def test_penalties_with_an_empty_output_touch_only_repetition():
    """Before the first token only the prompt is seen: repetition applies to it, frequency and presence to none."""
    logits = [1.2, -2.0, 0.3, -0.7]
    params = SamplingParams(repetition_penalty=1.9, frequency_penalty=1.0, presence_penalty=1.5)
    got = apply_penalties(torch.tensor(logits), params, [0, 1], [])
    assert got.tolist() == pytest.approx(_penalized(logits, 1.9, 1.0, 1.5, [0, 1], []), abs=1e-6)


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
