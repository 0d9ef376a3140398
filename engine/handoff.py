"""One layer's traffic between a GPU side and the CPU side, per step (PowerInfer's one transfer per layer).

To the host: the FFN input and the active mask (and, in oracle mode, the true activations) cross once, into
pinned buffers, asynchronously on the GPU device's copy stream; an event says when they have landed, and the
CPU side's worker waits on it, not the host thread, which goes on launching the hot side's kernels. Back: the
CPU side's partial output through a pinned buffer, asynchronously on the device's current stream.
Where no CUDA device is involved, tensors pass through unchanged.
"""

from __future__ import annotations

import torch


class Handoff:
    def __init__(self, device: torch.device, max_tokens: int):
        self.device, self.max_tokens = device, max_tokens
        self.cuda = device.type == "cuda"
        self._pinned: dict[tuple[int | str, torch.dtype], torch.Tensor] = {}
        self._stream = self._landed = self._returned = None
        if self.cuda:
            with torch.cuda.device(device):  # streams and events belong to the device they serve
                self._stream = torch.cuda.Stream(device)
                self._landed, self._returned = torch.cuda.Event(), torch.cuda.Event()

    def to_host(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Host copies of `tensors` (each [T, ...]) and the event after which they hold their values (None:
        they already do). CPU tensors pass through; chunks longer than max_tokens are copied synchronously."""
        on_gpu = [t.device.type == "cuda" for t in tensors]
        if not any(on_gpu) or tensors[0].shape[0] > self.max_tokens:
            return [t.cpu() for t in tensors], None
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # the inputs are made on the current stream
        out = []
        with torch.cuda.stream(self._stream):
            for i, (t, gpu) in enumerate(zip(tensors, on_gpu)):
                if gpu:
                    t.record_stream(self._stream)  # not reused by the allocator before this copy has run
                    t = self._buffer(i, t).copy_(t, non_blocking=True)
                out.append(t)
            self._landed.record(self._stream)
        return out, self._landed

    def to_device(self, y: torch.Tensor) -> torch.Tensor:
        """y (on the host) on the GPU side's device: through a pinned buffer, asynchronously."""
        if not self.cuda or y.shape[0] > self.max_tokens:
            return y.to(self.device)
        self._returned.synchronize()  # the last asynchronous copy out of the buffer (none yet: no wait)
        out = self._buffer("y", y).copy_(y).to(self.device, non_blocking=True)
        self._returned.record(torch.cuda.current_stream(self.device))
        return out

    def _buffer(self, key: int | str, t: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer of this layer for t (room for max_tokens rows)."""
        k = (key, t.dtype)
        if k not in self._pinned or self._pinned[k].shape[1:] != t.shape[1:]:
            self._pinned[k] = torch.empty(self.max_tokens, *t.shape[1:], dtype=t.dtype, pin_memory=True)
        return self._pinned[k][: t.shape[0]]
