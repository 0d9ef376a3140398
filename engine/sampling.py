"""Sampling parameters and the sampler: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Each sequence draws from its own torch.Generator, so a seeded request gives the same tokens whatever else
shares its batch. No value `validate` admits can make the distribution NaN: temperatures under 1e-5 mean
greedy (as vLLM), the most likely token always survives top-p / min-p, and logits stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hotcold.engine.errors import HotcoldError

MIN_TEMPERATURE = 1e-5  # below: greedy (a softmax over logits / 1e-39 is inf / inf)
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0  # repetition_penalty 1e-300 would scale logits to infinity
MAX_STOP_STRINGS = 64  # each is matched after every token (OpenAI allows 4)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per token; 0 = the chosen token's logprob only
    prompt_logprobs: int | None = None  # score the prompt too (echo), with this many alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             "max_tokens must be at least 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY,
             f"repetition_penalty must be in [{MIN_PENALTY}, {MAX_PENALTY}]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt logprobs must be in [0, 20]"),
            (all(math.isfinite(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
             "logit_bias values must be in [-100, 100]"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise HotcoldError(message)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """Repetition penalty over prompt+output (transformers' rule); presence/frequency over output (OpenAI's)."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: the tokens outside the kept set get -inf (never the most
    likely one, so the distribution is never empty)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if bias:
        ids = torch.tensor(list(bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits


def token_logprob(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """The model's logprob of `token` under logits [V], with the `top` most likely alternatives."""
    raw = logits.float().log_softmax(-1)
    alternatives = {}
    if top:
        values, ids = raw.topk(top)
        alternatives = {int(i): float(v) for i, v in zip(ids, values)}
    return TokenLogprob(token, float(raw[token]), alternatives)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 prompt_ids: list[int], output_ids: list[int]) -> tuple[int, TokenLogprob | None]:
    """One token from float32 logits [V]; logprobs are those of the model (before penalties, bias and
    temperature)."""
    raw = logits
    logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
    logits = apply_logit_bias(logits, params.logit_bias).nan_to_num(nan=float("-inf")).clamp(-1e30, 1e30)
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = filter_logits(logits, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    logprob = token_logprob(raw, token, params.logprobs) if params.logprobs is not None else None
    return token, logprob
