"""A request's life in the engine: its tokens, KV slot, sampler state, and its text with stop strings cut."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from hotcold.engine.sampling import SamplingParams, TokenLogprob
from hotcold.engine.tokenizer import Tokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, never the whole text again."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int]
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    _text: str = ""
    _emitted: int = 0  # characters of _text already handed out

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def append(self, token: int, tokenizer: Tokenizer, max_model_len: int) -> str:
        """Add a sampled token; decide whether the request is done; return the text that is now safe to emit."""
        self.output_ids.append(token)
        params = self.params
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            self.finish_reason = "stop"
            return self._flush(self._text)
        text = tokenizer.decode(self.output_ids)
        cut = min((i for i in (text.find(s) for s in params.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            return self._flush(text[:cut])
        if len(self.output_ids) >= params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
            return self._flush(text)
        self._text = text
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for its next token
        for stop in params.stop:  # hold back a tail that may still become a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        delta, self._emitted = text[self._emitted: max(safe, self._emitted)], max(safe, self._emitted)
        return delta

    def _flush(self, text: str) -> str:
        delta, self._text, self._emitted = text[self._emitted:], text, len(text)
        return delta

    @property
    def text(self) -> str:
        return self._text
