"""Perplexity over a token stream: non-overlapping windows of `context` tokens, each scored from its start.

Within a window the first token has no history, so it is not scored; every other token is predicted from
the window's earlier tokens. exp(mean negative log-likelihood) over all scored tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hotcold.engine.errors import HotcoldError


@torch.inference_mode()
def window_nll(model, token_ids: list[int], context: int = 1024) -> tuple[float, int]:
    """Sum of negative log-likelihoods and the number of scored tokens."""
    if context < 2:
        raise HotcoldError("context must be at least 2 tokens")
    total, count = 0.0, 0
    for start in range(0, len(token_ids), context):
        window = torch.tensor(token_ids[start: start + context], dtype=torch.long)
        if window.numel() < 2:
            continue
        logits = model.forward_sequence(window)
        total += float(F.cross_entropy(logits[:-1].double(), window[1:].to(logits.device), reduction="sum"))
        count += window.numel() - 1
    return total, count


def perplexity(model, token_ids: list[int], context: int = 1024) -> float:
    total, count = window_nll(model, token_ids, context)
    if count == 0:
        raise HotcoldError("the text is too short to score (need at least 2 tokens)")
    return math.exp(total / count)
