"""KV blocks for sequences, with automatic prefix caching (nano-vllm's and vLLM's scheme).

Every full block of a sequence gets a hash chained from its predecessor's and its own token ids. A new
sequence reuses the blocks of the longest cached prefix of its prompt (reference-counted, shared, never
written again) and computes only the rest. Unreferenced blocks stay in the cache, least recently used
first out, until a block is needed. A sequence is admitted only when the blocks for its whole length
(prompt + max_tokens) can be promised, so a running sequence never waits for memory and nothing is preempted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class BlockTable:
    """A sequence's blocks, the hashes of its full blocks, and the blocks promised to it but not yet taken."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    promised: int = 0


def chain_hash(previous: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """A block's identity: its tokens and (through the previous block's hash) every token before them."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size, self.enable_caching = block_size, enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out: first
        self.cached: dict[bytes, int] = {}
        self.promised = 0
        self.num_referenced = 0  # blocks with a reference: kept here, not counted, as stats read it every step
        self.queried_tokens = 0  # prompt tokens looked up in the cache, and the ones found there
        self.hit_tokens = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, prompt: list[int]) -> tuple[list[int], list[bytes]]:
        """Blocks holding the longest cached prefix of `prompt`, leaving at least its last token to compute
        (its logits start the output)."""
        found, hashes, h = [], [], b""
        if not self.enable_caching:
            return found, hashes
        bs = self.block_size
        for i in range((len(prompt) - 1) // bs):
            tokens = tuple(prompt[i * bs: (i + 1) * bs])
            h = chain_hash(h, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
            hashes.append(h)
        return found, hashes

    def allocate(self, prompt: list[int], total_tokens: int, use_cache: bool = True) -> BlockTable | None:
        """A table for a new sequence of up to `total_tokens` tokens, its cached prefix filled in; None if
        the blocks it needs cannot be promised now. The cached tokens are `len(table.blocks) * block_size`."""
        found, hashes = self._cached_prefix(prompt) if use_cache else ([], [])
        needed = self.blocks_for(total_tokens) - len(found)
        reclaimed = sum(1 for b in found if self.blocks[b].ref_count == 0)  # cached but unreferenced
        if len(self.free) - reclaimed - self.promised < needed:
            return None
        for b in found:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
                self.num_referenced += 1
            block.ref_count += 1
        self.promised += needed
        if use_cache and self.enable_caching:
            self.queried_tokens += len(prompt)
            self.hit_tokens += len(found) * self.block_size
        return BlockTable(list(found), hashes, needed)

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Take promised blocks until the table holds `num_tokens` positions (evicting the least recently
        used cached block each time)."""
        while len(table.blocks) * self.block_size < num_tokens:
            if table.promised <= 0:
                raise RuntimeError("a sequence outgrew the blocks promised to it")
            block = self.blocks[self.free.popitem(last=False)[0]]
            if block.hash is not None:
                if self.cached.get(block.hash) == block.id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            self.num_referenced += 1
            table.blocks.append(block.id)
            table.promised -= 1
            self.promised -= 1

    def register(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Hash the blocks that `num_computed` tokens have filled since the last call, so others can reuse
        them."""
        bs = self.block_size
        while len(table.hashes) < num_computed // bs:
            i = len(table.hashes)
            tokens = tuple(token_ids[i * bs: (i + 1) * bs])
            h = chain_hash(table.hashes[-1] if table.hashes else b"", tokens)
            table.hashes.append(h)
            block = self.blocks[table.blocks[i]]
            if self.enable_caching and h not in self.cached and block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.id

    def release(self, table: BlockTable) -> None:
        """Drop a finished or aborted sequence's references; its full blocks stay cached (the prefix's first
        block last out), its partial ones are reused first."""
        for b in reversed(table.blocks):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.num_referenced -= 1
                self.free[b] = None
                if block.hash is None:
                    self.free.move_to_end(b, last=False)
        self.promised -= table.promised
        table.blocks, table.promised = [], 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
