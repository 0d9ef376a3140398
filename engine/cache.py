"""A static KV cache (gpt-fast style): one slot per running sequence, each slot as long as the context.

Slots make continuous batching simple — a sequence owns its slot from admission to finish, nothing is
preempted or copied — and memory is reserved up front (`torch.empty`: pages are touched only when used).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k/v [T, kv_heads, head_dim] of each token at (its slot, its position)."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of one slot, as [1, kv_heads, length, head_dim] views (no copy)."""
        return self.k[layer][slot: slot + 1, :, :length], self.v[layer][slot: slot + 1, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
