"""A request's life in the engine: its tokens, KV blocks, sampler state, and its text, detokenized one token
at a time (`tokenizers`' DecodeStream: each token costs the same however long the output) with stop strings
cut exactly."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from hotcold.engine.block_manager import BlockTable
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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first output, when asked for
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: str | None = None  # this request failed (finish_reason "error"); others in the step did not


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int]
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    table: BlockTable | None = None
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached: int = 0  # of those, the prompt tokens reused from the prefix cache
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    _pieces: list[str] = field(default_factory=list)  # text handed out
    _pending: str = ""  # decoded text held back: it may still become a stop string
    _decoder: DecodeStream | None = None
    _undecoded: int = 0  # trailing tokens the decoder holds (an incomplete UTF-8 character so far)
    _stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids, looked up after every token

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop_ids = frozenset(self.params.stop_token_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of prompt + output, without building the whole list (a step's slice)."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(0, start - p): max(0, stop - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

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
        if token in self._stop_ids or (token in self.eos_ids and not params.ignore_eos):
            self.finish_reason = "stop"
            self._flush_undecoded(tokenizer, self.output_ids[:-1])
            return self._emit(len(self._pending))
        piece = self._decoder.step(tokenizer.backend, token)
        self._undecoded = self._undecoded + 1 if piece is None else 0  # None: a partial UTF-8 character
        self._pending += piece or ""
        pending = self._pending
        cut = min((i for i in (pending.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            self._pending = pending[:cut]
            return self._emit(cut)
        if len(self.output_ids) >= params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
            self._flush_undecoded(tokenizer, self.output_ids)
            return self._emit(len(self._pending))
        return self._emit(len(pending) - _held_back(pending, params.stop))

    def finish_without_output(self) -> None:
        """A prompt-only request (echo with max_tokens 0): done after its prefill."""
        self.finish_reason = "length"

    def _flush_undecoded(self, tokenizer: Tokenizer, ids: list[int]) -> None:
        """At the end, the bytes of an unfinished character come out as U+FFFD, as a whole decode gives them."""
        if self._undecoded:
            context = ids[-self._undecoded - 4: -self._undecoded]
            self._pending += tokenizer.decode(context + ids[-self._undecoded:])[len(tokenizer.decode(context)):]
            self._undecoded = 0

    def _emit(self, n: int) -> str:
        delta, self._pending = self._pending[:n], self._pending[n:]
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._pieces)


def _held_back(pending: str, stops: list[str]) -> int:
    """The longest tail of `pending` that is a proper prefix of a stop string (it may still grow into one).
    Only the places where a stop string's first character occurs are tried: a per-token cost of a few
    C-level finds per stop string, not one comparison per character of it."""
    held = 0
    for s in stops:
        tail = pending[len(pending) - min(len(s) - 1, len(pending)):]
        i = tail.find(s[0])
        while i >= 0 and len(tail) - i > held:
            if s.startswith(tail[i:]):
                held = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return held
