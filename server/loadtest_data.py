"""Traffic and prompts for `hotcold loadtest`: arrival times and request bodies, as pure functions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotcold.engine.errors import HotcoldError

# Short, common English words: each is one token (with its leading space) in the usual BPE vocabularies
# (all of them in SmolLM2's), so N of them approximate an N-token prompt when no tokenizer is at hand.
WORDS = (
    "the of and to in is was for on that with as by at from his her time people year way day man thing "
    "world life hand part child eye woman place week case point number group problem fact good new "
    "first last long great little own other old right big high small large next early young few public "
    "same able make know take see come think look want give use find tell ask seem feel try leave call "
    "water house room book night home city name story money game line end state family school power "
    "head light car food door air music body river road sea tree sun town table land hour word side"
).split()


@dataclass
class Prompt:
    text: str | None  # a completion prompt, or the user message of a chat
    messages: list[dict] | None
    prompt_tokens: int  # estimate; the server's usage replaces it when given
    max_tokens: int


def arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds to wait before each request: 0 for the first, then gamma(shape=B, scale=1/(rate*B)) gaps,
    whose mean is 1/rate whatever B (B = 1 is a Poisson process). All zeros when rate is infinite."""
    gaps = np.zeros(n)
    if math.isinf(rate) or n <= 1:
        return gaps
    gaps[1:] = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return gaps


def draw_lengths(n: int, length: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """Integers uniform in [L*(1-ratio), L*(1+ratio)], at least 1."""
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def load_prompt_tokenizer(spec: str | None):
    """hotcold's tokenizer for `spec`, or (None, why not). Imported here: it may pull in heavy modules."""
    if not spec:
        return None, "no local model path known (pass --tokenizer default|PATH)"
    try:
        from hotcold.engine.tokenizer import load_tokenizer

        return load_tokenizer(spec), ""
    except Exception as exc:  # any failure means: approximate instead
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def random_prompts(n: int, input_len: int, output_len: int, ratio: float, rng: np.random.Generator,
                   tokenizer=None) -> list[Prompt]:
    """Prompts of random common words cut to the drawn token length (exact with a tokenizer, else 1/word)."""
    prompts = []
    in_lens, out_lens = draw_lengths(n, input_len, ratio, rng), draw_lengths(n, output_len, ratio, rng)
    for in_len, out_len in zip(in_lens, out_lens, strict=True):
        words = rng.choice(WORDS, size=in_len if tokenizer is None else 2 * in_len + 8)
        text = " ".join(words)
        count = in_len
        if tokenizer is not None:
            text = tokenizer.decode(tokenizer.encode(text)[:in_len])
            count = len(tokenizer.encode(text))
        prompts.append(Prompt(text=text, messages=None, prompt_tokens=count, max_tokens=out_len))
    return prompts


def file_prompts(path: str, n: int, output_len: int, chat: bool, tokenizer=None) -> list[Prompt]:
    """The first `n` rows of a JSONL file (cycled if shorter); tokens ~ len/4 without a tokenizer."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HotcoldError(f"{path}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HotcoldError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        content = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not isinstance(content, (str, list)):
            raise HotcoldError(f"{path}:{lineno}: expected an object with 'prompt' or 'messages'")
        if "messages" in row and not chat:
            raise HotcoldError(f"{path}:{lineno}: 'messages' needs --endpoint /v1/chat/completions")
        rows.append(row)
    if not rows:
        raise HotcoldError(f"{path}: no prompts in the file")
    prompts = []
    for i in range(n):
        row = rows[i % len(rows)]
        messages = row.get("messages")
        text = row.get("prompt") if messages is None else None
        plain = text if text is not None else " ".join(str(m.get("content", "")) for m in messages)
        count = len(tokenizer.encode(plain)) if tokenizer is not None else max(1, round(len(plain) / 4))
        max_tokens = row.get("max_tokens", row.get("output_len", output_len))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise HotcoldError(f"{path}: row {i % len(rows) + 1}'s max_tokens must be a whole number >= 1, "
                               f"not {max_tokens!r}")
        prompts.append(Prompt(text=text, messages=messages, prompt_tokens=count, max_tokens=max_tokens))
    return prompts
