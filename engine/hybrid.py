"""The hybrid executor: per FFN layer, compute only the active neurons — hot ones on the GPU side with the
Triton kernels, cold ones on CPU workers at the same time — and add the two partial outputs.

    predictor(x) or oracle threshold -> active mask [T, I] on the GPU side's device
      ├─ GPU side: hot ids compacted there (kernels.compact) -> gathered kernels reading the count ─┐
      └─ x and mask to the host once (engine/handoff.py) -> CPU worker: cold ids -> CPU kernels ────┴─> y_gpu + y_cpu

The host never waits for the GPU side within a layer: the hot side's ids and the counters stay on its
device, and only the CPU worker waits for the handed-off mask. Each token only ever sums its own active
neurons (per-token masks), so which neurons a request gets does not depend on what else is in its batch (the
GPU kernels' summation order does: GEMV or tl.dot, block and split sizes follow the batch's size and union,
so there a result can differ in its last bits; bitwise batch invariance is the CPU engine's). On the CPU
side a union too dense for the gather, or a prefill chunk too long, runs the dense product over its rows
(still masked per token; benchmarks/ffn_cpu.py measures the crossover); the GPU side takes long chunks
densely. With no CUDA device every neuron runs on the CPU side (a kernel backend named in the config
keeps the split, the "GPU side" then running those kernels on the CPU: the tests' stand-in).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from hotcold import kernels
from hotcold.engine.activations import kernel_activation
from hotcold.engine.counters import FFNCounters
from hotcold.engine.errors import HotcoldError
from hotcold.engine.handoff import Handoff
from hotcold.engine.layers import DenseFFN, NeuronRows, QuantFFN
from hotcold.engine.model import Transformer
from hotcold.engine.plan import LayerPlan, Plan
from hotcold.engine.sparsity import plan_predictor, predictor_input
from hotcold.kernels import native, qrows
from hotcold.kernels.quant import QuantTensor

log = logging.getLogger(__name__)
MODES = ("off", "oracle", "predictor")
PLACEMENTS = ("hybrid", "gpu", "cpu")


@dataclass
class HybridConfig:
    mode: str = "predictor"  # off | oracle | predictor
    placement: str = "hybrid"  # hybrid | gpu | cpu
    strategy: str = "threshold"  # predictor decision: threshold (sigmoid >= tau) | topk
    dense_above: float = 0.6  # union density above which a side of a batch (>1 token) runs dense: ffn_cpu.py
    #   measured the crossover at 0.56-0.9 for batch 4-16; at batch 1 the gather always wins
    max_sparse_tokens: int = 32  # longer chunks (prefill) run dense on both sides
    backend: str = "auto"  # kernels backend for the GPU side (auto: Triton on CUDA)
    # quantized models: a layer whose plan expects more than this share of neurons active per token stays
    # dense (None: the crossover kernels.calibrate measured on this machine; 1.0: every layer sparse)
    max_sparse_density: float | None = None

    def validate(self) -> HybridConfig:
        if self.mode not in MODES:
            raise HotcoldError(f"unknown sparsity mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.placement not in PLACEMENTS:
            raise HotcoldError(f"unknown placement {self.placement!r} (choose from {', '.join(PLACEMENTS)})")
        if self.strategy not in ("threshold", "topk"):
            raise HotcoldError("strategy must be threshold or topk")
        return self


class _Side(NeuronRows):
    """One side's copy of a layer's neurons: weights on its device and the map global id -> local row."""

    def __init__(self, dense: DenseFFN, ids: torch.Tensor, device: torch.device):
        self.device, self.num = device, ids.numel()
        full = ids.numel() == dense.intermediate_size and bool((ids == torch.arange(ids.numel())).all())
        same_device = dense.down_t.device == device
        if same_device and full:  # all neurons on this side: use the model's own tensors, no copy
            self.gate_up, self.down_t, self.gate_up_bias = dense.gate_up, dense.down_t, dense.gate_up_bias
        else:
            self.gate_up = dense.gate_up[ids].to(device).contiguous()
            self.down_t = dense.down_t[ids].to(device).contiguous()
            native.use_huge_pages(self.gate_up)
            native.use_huge_pages(self.down_t)
            self.gate_up_bias = None if dense.gate_up_bias is None else dense.gate_up_bias[ids].to(device)
        self.gated, self.activation, self.gelu_approximate = dense.gated, dense.activation, dense.gelu_approximate
        self.threshold = dense.threshold
        self.ids = ids.to(device)  # the global ids of its rows
        local = torch.zeros(dense.intermediate_size, dtype=torch.long)
        local[ids] = torch.arange(ids.numel())
        self.local = local.to(device)  # global id -> its row here (0 for the other side's: never read)
        self.all_rows = full  # local row == global id: no translation needed
        # the views the kernels take, sliced once (a slice costs microseconds; a small layer's call ~30)
        self.views = (self.up, self.gate, self.up_bias, self.gate_bias)


class HybridFFN(nn.Module):
    """A drop-in for DenseFFN driven by one layer of a plan."""

    def __init__(self, dense: DenseFFN, layer: LayerPlan, cfg: HybridConfig, gpu: torch.device,
                 pool: ThreadPoolExecutor | None, counters: FFNCounters):
        super().__init__()
        # the two sides hold the layer's only copy of its neurons: `dense` is not kept (a server with a plan
        # held the FFN twice, 1.28x the dense model's resident memory)
        self.layer, self.cfg, self.pool, self.counters = layer, cfg, pool, counters
        self.intermediate_size = dense.intermediate_size
        self.activation, self.index = kernel_activation(dense.activation, "none", dense.threshold), layer.index
        if dense.gelu_approximate != "none":
            raise HotcoldError("the sparse kernels implement exact-erf GELU only (model uses tanh GELU)")
        num = dense.intermediate_size
        hot = layer.hot_ids.long().cpu()
        if cfg.placement == "gpu":
            hot = torch.arange(num)
        elif cfg.placement == "cpu":
            hot = hot[:0]
        is_hot = torch.zeros(num, dtype=torch.bool)
        is_hot[hot] = True
        cold = (~is_hot).nonzero().flatten()
        self.hot = _Side(dense, hot, gpu)
        self.cold = _Side(dense, cold, torch.device("cpu"))
        self.is_hot, self.is_cold_host = is_hot.to(gpu), ~is_hot  # each on the device that reads it
        self.down_bias = None if dense.down_bias is None else dense.down_bias.to(gpu)
        self.norms = dense.down_t.float().norm(dim=1).to(gpu)  # ||down_t[i]||: oracle magnitudes
        self.handoff = Handoff(gpu, cfg.max_sparse_tokens)
        self.predictor, self.rule = None, {}
        if cfg.mode == "predictor":  # the rule MaskedFFN and the profiler's evaluation use (engine.sparsity)
            self.predictor, self.rule = plan_predictor(layer, cfg.strategy, gpu)

    def _dense_h(self, side: _Side, x: torch.Tensor) -> torch.Tensor:
        """fp32 activations of all of a side's rows (one GEMM), in the side's local order."""
        return side.activations(x.to(side.device, side.gate_up.dtype)).float()

    @property
    def wants_residual(self) -> bool:
        """True when the plan's predictor reads the residual before the FFN norm (Block then passes it)."""
        return self.predictor is not None and self.predictor.input == "residual"

    def active_mask(self, x: torch.Tensor, residual: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[T, I] bool of the neurons each token needs; in oracle mode also the dense activations."""
        if self.cfg.mode == "oracle":  # the true activations, each side over its rows, in global order
            h = torch.empty(x.shape[0], self.intermediate_size, dtype=torch.float32, device=x.device)
            for side in (self.hot, self.cold):
                if side.num:
                    h[:, side.ids.to(x.device)] = self._dense_h(side, x).to(x.device)
            return (h.abs() * self.norms) > self.layer.threshold, h
        return self.predictor.predict(predictor_input(self.predictor, x, residual), **self.rule), None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        mask, h_known = self.active_mask(x, residual)
        self.counters.add_mask(self.index, mask, self.is_hot)
        future = y_cold = None
        if self.cold.num:  # the input and the mask cross to the host once; the worker waits for them, not us
            sent, landed = self.handoff.to_host(x, mask, *(() if h_known is None else (h_known,)))
            job = functools.partial(self._cold_side, *sent[:2], sent[2] if len(sent) > 2 else None, landed)
            # a worker only when there is GPU-side work to overlap: otherwise the hop is pure overhead
            future = self.pool.submit(job) if self.pool and self.hot.num else None
            y_cold = None if future else job()
        y = self._hot_side(x, mask, h_known) if self.hot.num else None
        if future is not None:
            y_cold = future.result()
        if y_cold is not None:
            y_cold = self.handoff.to_device(y_cold)
            y = y_cold if y is None else y + y_cold
        if y is None:
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if self.down_bias is not None:
            y = y + self.down_bias
        return y.to(x.dtype)

    def _cold_side(self, x: torch.Tensor, mask: torch.Tensor, h_known: torch.Tensor | None,
                   landed: torch.cuda.Event | None) -> torch.Tensor | None:
        """The CPU side, on the host copies (after they land): its active ids, then its partial output."""
        if landed is not None:
            landed.synchronize()
        union = mask[0] if x.shape[0] == 1 else mask.any(0)
        ids = (union & self.is_cold_host).nonzero().flatten() if self.hot.num else union.nonzero().flatten()
        return self._side(self.cold, x, ids, mask, h_known) if ids.numel() else None

    def _hot_side(self, x: torch.Tensor, mask: torch.Tensor, h_known: torch.Tensor | None) -> torch.Tensor | None:
        """The GPU side's partial output, launched with no host sync: active ids compacted on the device."""
        side, T = self.hot, x.shape[0]
        cols = mask if side.all_rows else mask[:, side.ids]  # [T, hot rows]
        if h_known is not None or T > self.cfg.max_sparse_tokens:  # oracle's activations, or a long chunk
            if h_known is None:
                h = self._dense_h(side, x)
            else:
                h = h_known if side.all_rows else h_known[:, side.ids]
            h = h * cols
            return (h.to(side.down_t.dtype) @ side.down_t).float()
        local, count = kernels.compact(cols[0] if T == 1 else cols.any(0))
        up, gate, up_bias, gate_bias = side.views
        return kernels.gathered_ffn(x, up, side.down_t, local, self.activation, gate, up_bias,
                                    None if T == 1 else cols[:, local], gate_bias=gate_bias,
                                    backend=self.cfg.backend, count=count)

    def _side(self, side: _Side, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              h_known: torch.Tensor | None) -> torch.Tensor:
        """The CPU side's partial output over its active neurons `ids` (global), chosen on the host, masked
        per token; a dense product over its rows where the gather stops paying (ffn_cpu.py's crossover)."""
        local = ids if side.all_rows else side.local[ids]
        token_mask = None if x.shape[0] == 1 else mask[:, ids]  # one token: all of ids
        T = x.shape[0]
        dense_side = T > self.cfg.max_sparse_tokens or (T > 1 and ids.numel() > self.cfg.dense_above * side.num)
        if h_known is None and not dense_side:  # the sparse path proper: gather, activate, project down
            up, gate, up_bias, gate_bias = side.views
            return kernels.gathered_ffn(x, up, side.down_t, local, self.activation, gate, up_bias, token_mask,
                                        gate_bias=gate_bias, backend="cpu")
        if h_known is not None:
            h = _masked(h_known[:, ids], token_mask)
        else:  # all rows of this side, then keep only the active (token, neuron) pairs
            h = _masked(self._dense_h(side, x)[:, local], token_mask)
        if dense_side:
            h_rows = torch.zeros(x.shape[0], side.num, dtype=h.dtype, device=side.device)
            h_rows[:, local] = h
            return (h_rows.to(side.down_t.dtype) @ side.down_t).float()
        return kernels.gathered_down(h, side.down_t, local, torch.float32, backend="cpu")


def _masked(h: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    return h if token_mask is None else h * token_mask


def move_dense_parts(model: Transformer, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Attention, embeddings, norms and the head go to the GPU first (PowerInfer's order). A quantized
    model's matrices (GGUF blocks, which only the CPU kernels read) go as quantized rows (kernels.qrows:
    Q4_0/Q4_1/Q8_0, their bytes moved, products in the Triton kernels) or, other types, as `dtype` floats;
    its norms and activations then run in `dtype` (default bfloat16)."""
    quantized = model.quantized
    if model.device == device and not quantized:
        return
    move = functools.partial(to_gpu_side, device=device, dtype=(dtype or torch.bfloat16) if quantized else None)
    model.embed = move(model.embed)
    model.lm_head = model.embed if model.config.tie_word_embeddings else move(model.lm_head)
    model.pos_embed = move(model.pos_embed)
    model.inv_freq = None if model.inv_freq is None else model.inv_freq.to(device)  # stays float32
    for norm in [model.final_norm] + [n for layer in model.layers for n in (layer.attn_norm, layer.ffn_norm)]:
        norm.weight, norm.bias = move(norm.weight), move(norm.bias)
    for layer in model.layers:
        a = layer.attn
        a.wqkv, a.bqkv, a.wo, a.bo = move(a.wqkv), move(a.bqkv), move(a.wo), move(a.bo)


def to_gpu_side(t: torch.Tensor | QuantTensor | None, device: torch.device, dtype: torch.dtype | None = None):
    """A weight as a GPU side holds it: a matrix in GGUF blocks as quantized rows (kernels.qrows) where its
    type has them, else as `dtype` floats (bfloat16 by default); a float tensor moved, cast to `dtype` if given."""
    if t is None:
        return None
    if isinstance(t, QuantTensor) and qrows.supported(t):
        return qrows.from_quant(t).to(device)
    if isinstance(t, QuantTensor):
        return t.dequantize().to(device, dtype or torch.bfloat16)
    return t.to(device) if dtype is None else t.to(device, dtype)


def apply_hybrid(model: Transformer, plan: Plan, cfg: HybridConfig, fingerprint: str,
                 gpu_device: str | torch.device | None = None, workers: int = 1) -> FFNCounters:
    """Replace every layer's FFN by a HybridFFN; returns the counters the engine reports per step. The GPU
    side runs on `gpu_device` (default: the CPU; a CUDA device is never chosen silently)."""
    cfg.validate()
    plan.check_model(fingerprint)
    if model.config.num_experts:
        raise HotcoldError("hybrid execution of mixture-of-experts models is not supported")
    if len(plan.layers) != len(model.layers):
        raise HotcoldError(f"the plan has {len(plan.layers)} layers, the model {len(model.layers)}")
    gpu = torch.device(gpu_device or "cpu")
    if gpu.type == "cuda" and gpu.index is None:  # "cuda" -> "cuda:N": comparable with tensors' devices
        gpu = torch.device("cuda", torch.cuda.current_device())
    ffns = [layer.ffn for layer in model.layers]
    one_kind = all(isinstance(f, DenseFFN) for f in ffns) or all(isinstance(f, QuantFFN) for f in ffns)
    if cfg.mode != "off" and not one_kind:  # before anything changes
        raise HotcoldError("the model already runs a plan (or has no dense FFN to split): load it again")
    counters = FFNCounters()
    model.ffn_counters = counters
    if cfg.mode == "off":
        return counters
    gpu_side = gpu.type != "cpu" or cfg.backend != "auto"  # a kernel backend named in cfg stands in for one (tests)
    if isinstance(ffns[0], QuantFFN):
        if gpu_side:
            return _apply_quant_hybrid(model, plan, cfg, gpu, workers, counters)
        # no GPU side: every row on the CPU, over the checkpoint's blocks (engine/quant_sparse.py)
        from hotcold.engine.quant_sparse import QuantSparseFFN, expected_density
        from hotcold.kernels import calibrate

        limit = calibrate.current().sparse_max_density if cfg.max_sparse_density is None else cfg.max_sparse_density
        sparse = 0
        with native.large_frees_returned():  # the conversion's temporaries go back to the system
            for layer, layer_plan in zip(model.layers, plan.layers):
                if expected_density(layer_plan, cfg.mode, cfg.strategy) <= limit:  # else dense: it would not pay
                    layer.ffn = QuantSparseFFN(layer.ffn, layer_plan, cfg.mode, cfg.strategy, counters)
                    sparse += 1
        native.release_heap()  # the temporaries of down's transposition
        log.info("plan: %d of %d layers sparse (the others expect more than %.0f%% of their neurons active, "
                 "where the dense FFN is faster on this machine)", sparse, len(plan.layers), 100 * limit)
        return counters
    if not gpu_side and cfg.placement != "cpu":
        # no GPU: the "GPU side" would be the same cores through the same kernels, and splitting the neurons
        # only adds a thread hop and two thread teams per layer (benchmarks/placement_cpu.py): one side holds
        # them all
        log.info("no GPU side (device cpu): every neuron on the CPU side, as --placement cpu")
        cfg = dataclasses.replace(cfg, placement="cpu")
    move_dense_parts(model, gpu)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotcold-cold") if workers > 0 else None
    for layer, layer_plan in zip(model.layers, plan.layers):
        layer.ffn = HybridFFN(layer.ffn, layer_plan, cfg, gpu, pool, counters)
    native.release_heap()  # the dense FFNs' memory and the conversion's temporaries
    return counters


def _apply_quant_hybrid(model: Transformer, plan: Plan, cfg: HybridConfig, gpu: torch.device, workers: int,
                        counters: FFNCounters) -> FFNCounters:
    """Quantized FFNs with a GPU side (a CUDA device, or kernels named by cfg.backend): hot rows quantized
    there, cold ones on the CPU (engine/quant_hybrid.py); on a real GPU the dense parts go there too."""
    from hotcold.engine.quant_hybrid import QuantHybridFFN

    if gpu.type != "cpu":  # a real GPU: the dense parts run there, as quantized rows
        move_dense_parts(model, gpu)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotcold-cold") if workers > 0 else None
    for layer, layer_plan in zip(model.layers, plan.layers):
        layer.ffn = QuantHybridFFN(layer.ffn, layer_plan, cfg.mode, cfg.strategy, cfg.placement, gpu, cfg.backend,
                                   pool, counters, cfg.max_sparse_tokens)
    native.release_heap()  # the replaced FFNs and down's transposition
    return counters
