"""A plan's FFN over quantized weights with its hot neurons on a GPU (PowerInfer's split, on GGUF blocks).

Per layer, each neuron's rows live on one side only:
- hot side (the GPU device): gate and up rows as kernels.qrows.QRows (the file's blocks taken apart, no
  re-rounding), down as Q8_0 neuron-major rows (PowerInfer's down_t; a neuron subset of the input-major
  layout the CPU engine keeps would need its groups' scales too), read by the Triton kernels, which
  dequantize in registers: the hot rows cost their quantized bytes of GPU memory;
- cold side (the CPU): the same rows as the checkpoint's blocks, through kernels.quant's native sparse FFN
  on a worker thread, at the same time.

The rest of the model (attention, norms, embeddings, the head) runs where the dense parts are: on a CUDA
device they go there first, as quantized rows too (engine.hybrid.move_dense_parts), and the FFN's normed
input and active mask go to the CPU side once (engine/handoff.py); otherwise they stay on the CPU engine's
native path and the input goes to the GPU side. The hot side's active ids are compacted on its device
(kernels.compact), so the host never waits for it within a layer. The predictor runs on the GPU side
(float, the plan's weights). Every token sums only its own active neurons, so which neurons a token gets
does not depend on its batch (the GPU kernels' summation order does; see engine.hybrid).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from hotcold import kernels
from hotcold.engine.activations import kernel_activation
from hotcold.engine.handoff import Handoff
from hotcold.engine.layers import Norm, QuantFFN
from hotcold.engine.plan import LayerPlan
from hotcold.engine.sparsity import plan_predictor, predictor_input
from hotcold.kernels import native, qrows, quant


class QuantHybridFFN(nn.Module):
    """Drop-in for a QuantFFN driven by one plan layer, hot neurons on `gpu` (see the module docstring)."""

    folds_norm = True  # Block passes the RMS norm: it runs once, on the CPU, for both sides

    def __init__(self, ffn: QuantFFN, layer: LayerPlan, mode: str, strategy: str, placement: str,
                 gpu: torch.device, backend: str, pool: ThreadPoolExecutor | None, counters, max_tokens: int = 32):
        super().__init__()
        num, self.parts = ffn.intermediate_size, 2 if ffn.gated else 1
        self.intermediate_size, self.index, self.mode, self.layer = num, layer.index, mode, layer
        self.codes, self.down_bias, self.gpu, self.backend = ffn.codes, ffn.down_bias, gpu, backend
        self.pool, self.counters = pool, counters
        self.activation = kernel_activation(ffn.activation, ffn.gelu_approximate, ffn.codes[2])
        hot = {"gpu": torch.arange(num), "cpu": torch.arange(0)}.get(placement, layer.hot_ids.long().cpu())
        is_hot = torch.zeros(num, dtype=torch.bool)
        is_hot[hot] = True
        cold = (~is_hot).nonzero().flatten()
        gate_up = quant.untile(ffn.gate_up)  # [I * parts, H]: a neuron's gate and up rows side by side
        down_t = ffn.down_t if ffn.down_t is not None else quant.transpose(ffn.down, "Q8_0")
        rows = lambda ids: (ids[:, None] * self.parts + torch.arange(self.parts)).flatten()  # noqa: E731
        bias = None if ffn.gate_up_bias is None else ffn.gate_up_bias.float().view(num, self.parts)
        # hot side: separate gate and up rows (the Triton kernels' arguments), on the GPU
        side = [qrows.from_quant(gate_up.rows(hot * self.parts + p)).to(gpu) for p in range(self.parts)]
        self.hot_up, self.hot_gate = side[-1], side[0] if self.parts == 2 else None
        self.hot_down = qrows.from_quant(down_t.rows(hot)).to(gpu)
        self.hot_bias = None if bias is None else [bias[hot, p].contiguous().to(gpu) for p in range(self.parts)]
        # cold side: the checkpoint's blocks on the CPU
        self.cold_gate_up, self.cold_down_t = gate_up.rows(rows(cold)), down_t.rows(cold)
        for t in (self.cold_gate_up.data, self.cold_down_t.data):
            native.use_huge_pages(t)  # gathered rows: a TLB walk each on 4 KiB pages
        self.cold_bias = None if bias is None else bias[cold].reshape(-1).contiguous()
        local = torch.zeros(num, dtype=torch.long)
        local[cold] = torch.arange(cold.numel())
        self.local_cold, self.is_cold = local, ~is_hot  # host tables, read by the CPU side
        self.is_hot, self.num_hot, self.num_cold = is_hot.to(gpu), hot.numel(), cold.numel()
        self.hot_ids, self.cold_ids, self._cold_on_gpu = hot.to(gpu), cold, cold.to(gpu)  # hot_ids: row order
        self.handoff = Handoff(gpu, max_tokens)
        self.predictor, self.rule = plan_predictor(layer, strategy, gpu) if mode == "predictor" else (None, {})
        if mode == "oracle":  # |h_i| * ||down_t[i]|| > threshold: the plan's activity rule
            self.norms = down_t.dequantize().norm(dim=1).to(gpu)

    @property
    def wants_residual(self) -> bool:
        return self.predictor is not None and self.predictor.input == "residual"

    def _hot_h(self, x: torch.Tensor, local: torch.Tensor, token_mask: torch.Tensor | None,
               count: torch.Tensor | None = None) -> torch.Tensor:
        up_bias, gate_bias = (None, None) if self.hot_bias is None else (self.hot_bias[-1], self.hot_bias[0]
                                                                          if self.parts == 2 else None)
        return kernels.gathered_gate_up(x, self.hot_up, local, self.activation, self.hot_gate, up_bias, token_mask,
                                        gate_bias=gate_bias, backend=self.backend, count=count)

    def active_mask(self, x: torch.Tensor, x_gpu: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """[T, I] bool on the GPU side's device: the neurons each token computes (oracle mode: the true
        activations, each side over its rows; a mode for checking, so its host copies are plain ones)."""
        if self.predictor is not None:
            return self.predictor.predict(predictor_input(self.predictor, x_gpu, residual), **self.rule)
        h = torch.empty(x_gpu.shape[0], self.intermediate_size, dtype=torch.float32, device=self.gpu)
        if self.num_hot:
            h[:, self.hot_ids] = self._hot_h(x_gpu, torch.arange(self.num_hot, device=self.gpu), None)
        if self.num_cold:
            z = quant.dots(self.cold_gate_up, x.cpu(), parts=self.parts)
            h[:, self._cold_on_gpu] = quant.activate(z, self.codes[0], self.codes[1], self.cold_bias,
                                                              self.codes[2]).to(self.gpu)
        return h.abs() * self.norms > self.layer.threshold

    def forward(self, x: torch.Tensor, norm: Norm | None = None, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x lives where the dense parts run: the CPU engine's path, or the GPU with them (hybrid.move_dense_parts)
        xn = (x if norm is None else norm(x)).float().contiguous()
        x_gpu = xn.to(self.gpu)
        if residual is not None:
            residual = residual.to(self.gpu)
        mask = self.active_mask(xn, x_gpu, residual)
        T = x.shape[0]
        self.counters.add_mask(self.index, mask, self.is_hot)
        future = y_cold = None
        if self.num_cold:  # the input and the mask cross to the host once; the worker waits for them, not us
            (x_host, mask_host), landed = self.handoff.to_host(xn, mask)
            job = functools.partial(self._cold_side, x_host, mask_host, landed)
            future = self.pool.submit(job) if self.pool is not None and self.num_hot else None
            y_cold = None if future is not None else job()
        y = self._hot_side(x_gpu, mask).to(x.device) if self.num_hot else None
        if future is not None:
            y_cold = future.result()
        if y_cold is not None:
            y_cold = self.handoff.to_device(y_cold) if x.device == self.gpu else y_cold.to(x.device)
            y = y_cold if y is None else y + y_cold
        if y is None:
            y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        if self.down_bias is not None and self.down_bias.device != x.device:
            self.down_bias = self.down_bias.to(x.device)  # once: where the dense parts run
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)

    def _hot_side(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The GPU side's partial output, launched with no host sync: active ids compacted on the device."""
        cols = mask[:, self.hot_ids]
        local, count = kernels.compact(cols[0] if x.shape[0] == 1 else cols.any(0))
        h = self._hot_h(x, local, None if x.shape[0] == 1 else cols[:, local], count)
        return kernels.gathered_down(h, self.hot_down, local, torch.float32, backend=self.backend, count=count)

    def _cold_side(self, x: torch.Tensor, mask: torch.Tensor, landed) -> torch.Tensor | None:
        """The CPU side on the host copies (after they land): its active ids, then the file's blocks."""
        if landed is not None:
            landed.synchronize()
        union = mask[0] if x.shape[0] == 1 else mask.any(0)
        ids = (union & self.is_cold).nonzero().flatten()
        if not ids.numel():
            return None
        return quant.sparse_ffn(x, self.cold_gate_up, self.cold_down_t, self.parts, self.local_cold[ids],
                                self.codes[0], self.codes[1], mask=None if x.shape[0] == 1 else mask[:, ids],
                                gate_up_bias=self.cold_bias, threshold=self.codes[2])
