"""Continuous batching: which sequences run in the next step and how many of their tokens.

Decodes go first (one token each, so running requests keep their pace), then unfinished prefills, then
new requests in arrival order while KV slots and the step's token budget last. Long prompts are prefilled
in chunks across steps. A sequence keeps its slot from admission to finish, so nothing is ever preempted.
"""

from __future__ import annotations

from collections import deque

from hotcold.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.max_num_batched_tokens = max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        decodes = [s for s in self.running if s.num_pending == 1]
        prefills = [s for s in self.running if s.num_pending > 1]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            n = min(seq.num_pending, budget)
            plan.append((seq, n))
            budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.free_slots.pop(), Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.slot = Status.FINISHED, None

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request_id == request_id), None)
