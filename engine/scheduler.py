"""Continuous batching with chunked prefill: which sequences run in the next step and how many of their tokens.

Every step runs one token of each decoding sequence, then prompt chunks, shortest remaining prompt first,
under the step's budget, so a short request is not queued behind a long prompt. New requests are admitted
in arrival order while there is room in the batch and their KV blocks can be promised (engine/block_manager.py:
a cached prompt prefix is reused, not recomputed). Nothing is ever preempted.

The budget is counted in token-equivalents: a token at position p costs 1 + p / attention_scale, because
its attention reads p keys besides the weights every token reads. While other sequences wait on the step,
While sequences are decoding, a step's cost is also capped so that it should take no longer than
`max_step_seconds`, judged from the times of earlier steps (`StepTimes`): a long prompt then slows the
streams down, boundedly, instead of stalling them (with no stream waiting, prompts go at full speed).
"""

from __future__ import annotations

from collections import deque

from hotcold.engine.block_manager import BlockManager
from hotcold.engine.sequence import Sequence, Status

MIN_CHUNK = 16  # prompt tokens a step gives a prefill at least, however slow the step is
FIRST_CHUNK = 64  # a prefill's chunk while others wait and no step time has been measured yet


class StepTimes:
    """How long steps take: a fixed overhead, learned from the small steps (a few decodes), plus a rate per
    token-equivalent, learned from the large ones net of that overhead; both moving averages, so the rate
    follows what the cost model misses (attention deep in a long prompt runs slower than its flops say)."""

    SMALL = 4  # token-equivalents: a step this small is mostly overhead

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.overhead = 0.0
        self.rate: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def add(self, cost: float, seconds: float) -> None:
        if cost <= self.SMALL:
            self.overhead = self._average(self.overhead or None, seconds)
        else:
            self.rate = self._average(self.rate, max(seconds - self.overhead, 0.1 * seconds) / cost)

    def budget(self, seconds: float) -> float | None:
        """Token-equivalents a step may cost to take `seconds`; None until a large step was measured."""
        return None if self.rate is None else (seconds - self.overhead) / self.rate


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager,
                 attention_scale: float = float("inf"), max_step_seconds: float | None = 0.25):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.blocks = blocks
        self.attention_scale, self.max_step_seconds = attention_scale, max_step_seconds
        self.step_times = StepTimes()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cost(self, start: int, n: int) -> float:
        """Token-equivalents of n tokens at positions start.. of one sequence."""
        return n * (1.0 + (start + (n - 1) / 2) / self.attention_scale)

    def _chunk(self, start: int, budget: float) -> int:
        """The most tokens from position `start` that fit `budget` token-equivalents (at least 1)."""
        per_token = 1.0 + start / self.attention_scale
        n = max(1, int(budget / per_token))
        while n > 1 and self.cost(start, n) > budget:
            n = int(n * 0.9)
        return n

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            table = self.blocks.allocate(seq.prompt_ids, seq.num_prompt_tokens + seq.params.max_tokens,
                                         use_cache=seq.params.prompt_logprobs is None)
            if table is None:
                break
            self.waiting.popleft()
            seq.table, seq.status = table, Status.RUNNING
            seq.num_computed = len(table.blocks) * self.blocks.block_size
            seq.num_cached = seq.num_computed
            self.running.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        self._admit()
        decodes = [s for s in self.running if s.num_pending == 1]
        prefills = sorted((s for s in self.running if s.num_pending > 1), key=lambda s: s.num_pending)
        plan = [(s, 1) for s in decodes]
        spent = sum(self.cost(s.num_computed, 1) for s in decodes)
        budget = float(self.max_num_batched_tokens)
        if decodes and prefills and self.max_step_seconds:  # someone is streaming: keep its pace
            capped = self.step_times.budget(self.max_step_seconds)
            budget = min(budget, spent + FIRST_CHUNK if capped is None else capped)
        for i, seq in enumerate(prefills):
            left = budget - spent
            if left < 1 and i > 0:
                break
            n = self._chunk(seq.num_computed, left) if left >= 1 else 1
            n = min(seq.num_pending, max(n, MIN_CHUNK if i == 0 else 1))  # the first prefill always moves
            plan.append((seq, n))
            spent += self.cost(seq.num_computed, n)
        for seq, n in plan:
            self.blocks.grow(seq.table, seq.num_computed + n)
        return plan

    def observe(self, plan: list[tuple[Sequence, int]], seconds: float) -> None:
        """Learn how long steps take from one that ran (after its sequences' num_computed moved on)."""
        self.step_times.add(sum(self.cost(s.num_computed - n, n) for s, n in plan), seconds)

    def computed(self, seq: Sequence) -> None:
        """After a step: make the sequence's newly filled blocks reusable by later requests."""
        if seq.num_computed // self.blocks.block_size > len(seq.table.hashes):
            self.blocks.register(seq.table, seq.all_ids, seq.num_computed)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq.table)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request_id == request_id), None)
