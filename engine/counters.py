"""What a plan's FFNs did in a step: neurons computed against available, and the share the GPU side served.

A GPU side counts on its device (0-d tensors) and the counts stay there until the engine reads them, once per
step: one transfer per step instead of a host sync per layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Count = int | torch.Tensor


@dataclass
class FFNCounters:
    _pending: list[tuple[int, Count, Count, int]] = field(default_factory=list)  # (layer, computed, hot, total)
    _computed: int = 0
    _total: int = 0
    _hot: int = 0
    _density: dict[int, float] = field(default_factory=dict)

    def add(self, layer: int, computed: Count, hot: Count, total: int) -> None:
        """One layer's step: token-neuron pairs active (`computed`), of them served hot, out of `total`."""
        self._pending.append((layer, computed, hot, total))

    def add_mask(self, layer: int, mask: torch.Tensor, is_hot: torch.Tensor) -> None:
        """One layer's step from its active mask [T, I] and which neurons are hot [I], both on one device:
        counted there, read later."""
        self.add(layer, mask.sum(), (mask & is_hot).sum(), mask.numel())

    def reset(self) -> None:
        self._pending.clear()
        self._computed = self._total = self._hot = 0
        self._density.clear()

    def _settle(self) -> None:
        if not self._pending:
            return
        counts = [v for _, c, h, _ in self._pending for v in (c, h)]
        tensors = [v for v in counts if isinstance(v, torch.Tensor)]
        if tensors and len({t.device for t in tensors}) == 1 and len(tensors) == len(counts):
            values = torch.stack([t.reshape(()).to(torch.int64) for t in tensors]).tolist()  # one copy
        else:
            values = [int(v) for v in counts]
        for i, (layer, _, _, total) in enumerate(self._pending):
            computed, hot = values[2 * i], values[2 * i + 1]
            self._computed, self._total, self._hot = self._computed + computed, self._total + total, self._hot + hot
            self._density[layer] = computed / total if total else 0.0
        self._pending.clear()

    @property
    def computed(self) -> int:
        self._settle()
        return self._computed

    @property
    def total(self) -> int:
        self._settle()
        return self._total

    @property
    def hot(self) -> int:
        self._settle()
        return self._hot

    @property
    def per_layer_density(self) -> dict[int, float]:
        self._settle()
        return self._density

    @property
    def sparsity(self) -> float | None:
        return None if not self.total else 1.0 - self.computed / self.total

    @property
    def hot_share(self) -> float | None:
        return None if not self.computed else self.hot / self.computed
