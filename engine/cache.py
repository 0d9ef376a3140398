"""The KV cache in fixed-size blocks (vLLM's paged layout): k[layer] and v[layer] are
[num_blocks, block_size, kv_heads, head_dim], and each sequence owns a list of block ids, its block table.

Blocks let sequences share the blocks of a common prompt prefix (engine/block_manager.py) and let the cache
hold as many sequences as their actual lengths allow. Memory is reserved up front with `torch.empty`: pages
are touched only when a block is first written.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"the KV block size must be a power of two, not {block_size}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [T, kv_heads, head_dim] of each token at its cache row (block * block_size + offset)."""
        self.k[layer].view(-1, *self.k[layer].shape[2:])[rows] = k
        self.v[layer].view(-1, *self.v[layer].shape[2:])[rows] = v

    def gather(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of the sequence whose block table is `table`, as
        [1, kv_heads, length, head_dim] (a copy: its blocks need not be adjacent)."""
        nb = -(-length // self.block_size)

        def one(t: torch.Tensor) -> torch.Tensor:
            rows = t[table[:nb]].flatten(0, 1)[:length]  # [length, kv_heads, head_dim]
            return rows.transpose(0, 1).unsqueeze(0)

        return one(self.k[layer]), one(self.v[layer])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def rows_of(tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int) -> torch.Tensor:
    """Each token's cache row (block id * block_size + offset in the block) for a step's sequences."""
    rows = []
    for table, start, n in zip(tables, starts, lengths):
        rows += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
    return torch.tensor(rows, dtype=torch.long)
