"""The transformer in plain PyTorch: one block type for every supported architecture.

A step runs the flattened tokens of several sequences at once ([T, hidden]); only attention looks at
sequence boundaries (`StepBatch`). The FFN is a replaceable module per layer: `DenseFFN` here, sparse
versions elsewhere, all with `activations(x) -> h` and `project_down(h) -> y`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hotcold.engine.activations import activate, gate_up_bias, kernel_activation
from hotcold.engine.cache import KVCache, rows_of
from hotcold.engine.config import GATED, ModelConfig
from hotcold.engine.input_sparsity import SparseInput
from hotcold.kernels import cpu_sparse, native, quant
from hotcold.kernels.input_sparse import InputMajor
from hotcold.kernels.quant import QuantTensor
from hotcold.kernels.reference import FUNCTIONS

Weight = torch.Tensor | QuantTensor | SparseInput


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None, norm: Norm | None = None) -> torch.Tensor:
    """F.linear(norm(x)), but quantized weights run in their blocks (kernels.quant, with an RMS norm folded
    into the same call), and a few tokens over float weights on the CPU go through the native kernels where
    the calibration measured them faster than torch (kernels.calibrate). fp32 accumulation. A SparseInput weight
    drops its small inputs first (engine.input_sparsity)."""
    if isinstance(w, SparseInput):
        return w.product(x if norm is None else norm(x), b)
    if isinstance(w, QuantTensor):
        fold = norm is not None and norm.kind == "rms"
        if norm is not None and not fold:
            x = norm(x)
        y = quant.linear(x.reshape(-1, x.shape[-1]), w, norm=norm.weight if fold else None,
                         eps=norm.eps if fold else 0.0).view(*x.shape[:-1], w.shape[0])
        return (y if b is None else y + b.float()).to(x.dtype)
    if norm is not None:
        x = norm(x)
    if x.dim() == 2 and native.preferred(x.shape[0], w):
        y = native.linear(x, w)
        return (y if b is None else y + b.float()).to(x.dtype)
    return F.linear(x, w, b)


class NeuronRows:
    """Views of interleaved gate/up rows (`gate_up` [I, 2, H] when gated, else up [I, H]) and their biases."""

    activation: str
    gelu_approximate: str
    threshold: float  # FATReLU's t
    gated: bool
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """h [.., I] of every row: one GEMM for gate and up."""
        if self.gated:
            bias = None if self.gate_up_bias is None else self.gate_up_bias.reshape(-1)
            z = F.linear(x, self.gate_up.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1, 2)
            return activate(self.activation, z[..., 1], z[..., 0], self.gelu_approximate, self.threshold)
        return activate(self.activation, F.linear(x, self.gate_up, self.gate_up_bias), None, self.gelu_approximate,
                        self.threshold)

    @property
    def gate(self) -> torch.Tensor | None:
        return self.gate_up[:, 0] if self.gated else None

    @property
    def up(self) -> torch.Tensor:
        return self.gate_up[:, 1] if self.gated else self.gate_up

    @property
    def up_bias(self) -> torch.Tensor | None:
        if self.gate_up_bias is None:
            return None
        return self.gate_up_bias[:, 1] if self.gated else self.gate_up_bias

    @property
    def gate_bias(self) -> torch.Tensor | None:
        return self.gate_up_bias[:, 0] if self.gated and self.gate_up_bias is not None else None


class DenseFFN(nn.Module, NeuronRows):
    """All neurons. Each neuron owns contiguous rows: gate and up interleaved as `gate_up` [I, 2, H] (one GEMM
    for both, and one gather fetches both rows of a neuron), down stored transposed as `down_t` [I, H]."""

    def __init__(self, activation: str, up: torch.Tensor, down_t: torch.Tensor, gate: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, gelu_approximate: str = "none", threshold: float = 0.0):
        super().__init__()
        self.activation = activation
        self.gelu_approximate = gelu_approximate
        self.threshold = threshold
        self.intermediate_size = up.shape[0]
        self.gated = activation in GATED
        self.gate_up = torch.stack([gate, up], dim=1).contiguous() if self.gated else up.contiguous()
        self.gate_up_bias = gate_up_bias(self.gated, up_bias, gate_bias)
        self.down_t = down_t.contiguous()
        self.down_bias = down_bias

    def project_down(self, h: torch.Tensor) -> torch.Tensor:
        y = h @ self.down_t
        return y if self.down_bias is None else y + self.down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and native.preferred(x.shape[0], self.gate_up, self.down_t):
            return self._forward_native(x)
        return self.project_down(self.activations(x))

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """A few tokens on the CPU: every row through the native kernels (one call), which stream each row
        once where torch's small-M product reaches half the memory bandwidth (2x: benchmarks/ffn_cpu.py).
        fp32 accumulation; h is rounded to the weights' dtype before the down projection, as torch's is."""
        y = cpu_sparse.gathered_ffn(x, self.up, self.down_t, torch.arange(self.intermediate_size),
                                    kernel_activation(self.activation, self.gelu_approximate, self.threshold),
                                    self.gate,
                                    self.up_bias, gate_bias=self.gate_bias)
        return (y if self.down_bias is None else y + self.down_bias.float()).to(x.dtype)


class QuantFFN(nn.Module):
    """The dense FFN over quantized weights, kept as the checkpoint stores them: gate and up rows interleaved
    (one product for both, [2I, H]) and down as [H, I] rows (GGUF's own layout: no re-quantization)."""

    folds_norm = True  # Block passes the RMS norm in: it runs inside the native call

    def __init__(self, activation: str, up: QuantTensor, down: QuantTensor | None, gate: QuantTensor | None = None,
                 up_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, gelu_approximate: str = "none", threshold: float = 0.0,
                 down_t: QuantTensor | None = None):
        super().__init__()
        self.activation, self.gelu_approximate = activation, gelu_approximate
        self.gated = activation in GATED
        self.intermediate_size = up.shape[0]
        self.gate_up = quant.interleave(gate, up) if self.gated else up
        bias = gate_up_bias(self.gated, up_bias, gate_bias)
        self.gate_up_bias = None if bias is None else bias.reshape(-1)  # matches gate_up's interleaved rows
        # down [H, I] as GGUF stores it, or (PowerInfer GGUFs: `ffn_down_t`) only its neuron-major down_t [I, H]
        self.down, self.down_t, self.down_bias = down, down_t, down_bias
        self._all = torch.arange(self.intermediate_size)
        spec = kernel_activation(activation, gelu_approximate, threshold)
        self.codes = (FUNCTIONS[spec.gate_fn], FUNCTIONS[spec.up_fn], spec.threshold)  # as BlockWeights takes them

    def forward(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """One native call: RMS norm (when given), gate/up product, activation, down product."""
        if norm is not None and norm.kind != "rms":
            x, norm = norm(x), None
        if isinstance(self.gate_up, SparseInput) or isinstance(self.down, SparseInput):
            return self._forward_input_sparse(x, norm)
        if self.down is None:  # every neuron through the sparse kernel over down_t: no second copy of down
            y = quant.sparse_ffn(x, self.gate_up, self.down_t, 2 if self.gated else 1, self._all, self.codes[0],
                                 self.codes[1], gate_up_bias=self.gate_up_bias,
                                 norm=None if norm is None else norm.weight, eps=norm.eps if norm else 0.0,
                                 threshold=self.codes[2])
            return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)
        y = quant.ffn(x, self.gate_up, self.down, 2 if self.gated else 1, self.codes[0], self.codes[1],
                      self.gate_up_bias, None if norm is None else norm.weight, norm.eps if norm else 0.0,
                      threshold=self.codes[2])
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)


    def _forward_input_sparse(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """The per-op path with input-sparse products (engine.input_sparsity): every token sparse."""
        z = linear(x, self.gate_up, None, norm).float()
        parts = 2 if self.gated else 1
        h = quant.activate(z.view(-1, self.intermediate_size, parts), *self.codes[:2], self.gate_up_bias,
                           self.codes[2])
        y = linear(h, self.down).float()
        return (y if self.down_bias is None else y + self.down_bias).to(x.dtype)


class MoEFFN(nn.Module):
    """Mixtral's sparse mixture of experts: softmax router, top-k experts, weights renormalised."""

    def __init__(self, router: torch.Tensor, experts: list[DenseFFN], top_k: int):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            if tokens.numel():
                out.index_add_(0, tokens, expert(x[tokens]) * weights[tokens, slot, None])
        return out


class Norm(nn.Module):
    """RMSNorm (computed in float32, as transformers does) or LayerNorm."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.kind, self.weight, self.bias, self.eps = kind, weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        normed = F.rms_norm(x.float(), x.shape[-1:], None, self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with transformers' llama3 and linear scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return inv_freq / float(scaling["factor"])
    if scaling.get("rope_type") == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass
class StepBatch:
    """Where each sequence of a step sits: its KV block table, its first new position, its token count."""

    tables: list[list[int]]
    starts: list[int]
    lengths: list[int]

    def token_positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.lengths)])

    def token_seqs(self) -> torch.Tensor:
        """Each token's sequence (its row in `tables_tensor`)."""
        return torch.cat([torch.full((n,), i) for i, n in enumerate(self.lengths)])

    @functools.cached_property
    def tables_tensor(self) -> torch.Tensor:
        """The block tables as one int64 tensor [sequences, longest table], padded with block 0 (built once
        per step, read by every layer)."""
        width = max(1, max(len(t) for t in self.tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.long)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
                 wo: torch.Tensor, bo: torch.Tensor | None):
        super().__init__()
        self.cfg = cfg
        self.wqkv, self.bqkv, self.wo, self.bo = wqkv, bqkv, wo, bo
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: StepBatch,
                cache: KVCache | None, layer: int, cache_rows: torch.Tensor | None,
                positions: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """Attention over norm(x) (the norm folded into the qkv product where the kernels can)."""
        cfg, T = self.cfg, x.shape[0]
        qkv = linear(x, self.wqkv, self.bqkv, norm).to(attn_dtype(x.device, x.dtype))
        heads = cfg.num_heads + cfg.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(T, heads, cfg.head_dim)
        if rope is not None:
            qk = _apply_rope(qk, rope)  # q and k heads rotated together: one pass
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, cfg.num_kv_heads, cfg.head_dim)
        if cache is not None:
            cache.write(layer, cache_rows, k, v)
            tables = batch.tables_tensor.to(x.device)
        out = torch.empty(T, cfg.num_heads, cfg.head_dim, dtype=q.dtype, device=q.device)
        offset = 0
        for i, (start, n) in enumerate(zip(batch.starts, batch.lengths)):
            qs = q[offset: offset + n].transpose(0, 1).unsqueeze(0)
            if cache is None:
                ks = k[offset: offset + n].transpose(0, 1).unsqueeze(0)
                vs = v[offset: offset + n].transpose(0, 1).unsqueeze(0)
            else:
                ks, vs = cache.gather(layer, tables[i], start + n)
            mask, causal = _mask(start, n, cfg.sliding_window, x.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, enable_gqa=True)
            out[offset: offset + n] = o[0].transpose(0, 1)
            offset += n
        return linear(out.view(T, self.q_size).to(x.dtype), self.wo, self.bo)


def attn_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Attention (RoPE, KV cache, SDPA) runs in float32 on the CPU: torch's 16-bit CPU attention is several
    times slower than its float32 one (benchmarks/decode_cpu.py), and the cache is small next to the weights."""
    return torch.float32 if device.type == "cpu" else dtype


def _apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope  # [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _mask(start: int, n: int, window: int | None, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Causal (and sliding-window) mask for n queries at positions start.. over keys 0..start+n-1."""
    total = start + n
    if window is None or total <= window:
        if n == 1:
            return None, False
        if start == 0:
            return None, True
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed, False


class Block(nn.Module):
    def __init__(self, attn_norm: Norm, attn: Attention, ffn_norm: Norm, ffn: nn.Module, pre_norm: bool,
                 residual_scale: float = 1.0):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.pre_norm = pre_norm
        self.residual_scale = residual_scale  # MiniCPM's scale_depth / sqrt(num_layers) on each branch

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_scale == 1.0 else y * self.residual_scale

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        if self.pre_norm and getattr(self.ffn, "folds_norm", False):  # the norms run inside the native calls
            x = x + self._branch(self.attn(x, *attn_args, norm=self.attn_norm))
            return x + self._branch(self.ffn_after_attention(x))
        if self.pre_norm:
            x = x + self._branch(self.attn(self.attn_norm(x), *attn_args))
            return x + self._branch(self.ffn(self.ffn_norm(x), **self._residual(x)))
        x = self.attn_norm(x + self._branch(self.attn(x, *attn_args)))
        return self.ffn_norm(x + self._branch(self.ffn(x, **self._residual(x))))  # post-norm: x is the FFN input

    def _residual(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """An FFN whose predictor reads the residual before the FFN norm (PowerInfer's ffn_inp) says so with
        `wants_residual`; it gets that residual as a keyword, every other FFN only its input."""
        return {"residual": x} if getattr(self.ffn, "wants_residual", False) else {}

    def ffn_after_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN branch of a pre-norm block whose FFN folds the norm in (x: the residual after attention)."""
        return self.ffn(x, norm=self.ffn_norm, **self._residual(x))


def _native_matrix(w) -> tuple[QuantTensor | InputMajor, float] | None:
    """A matrix as the native block takes it: row-major blocks, or input-major with its inputs' threshold."""
    if isinstance(w, QuantTensor):
        return w, 0.0
    if isinstance(w, SparseInput) and isinstance(w.weight, InputMajor):
        return w.weight, w.threshold
    return None


def native_block(block: Block) -> quant.BlockWeights | None:
    """The block's weights for kernels.quant.block (one native call per block), or None where that kernel
    does not apply: it runs pre-norm RMS blocks whose matrices are all quantized (row-major, or input-major
    for input sparsity), on the CPU. A block whose FFN is another one that folds the norm in (a plan's sparse
    FFN) runs attention alone in that call (BlockWeights without gate_up), then its FFN."""
    attn, ffn, n1, n2 = block.attn, block.ffn, block.attn_norm, block.ffn_norm
    qkv, o = _native_matrix(attn.wqkv), _native_matrix(attn.wo)
    if not (block.pre_norm and getattr(ffn, "folds_norm", False) and qkv is not None and o is not None
            and n1.kind == n2.kind == "rms" and n1.eps == n2.eps):
        return None
    gu = _native_matrix(ffn.gate_up) if isinstance(ffn, QuantFFN) else None
    down = _native_matrix(ffn.down) if isinstance(ffn, QuantFFN) and ffn.down is not None else None
    if gu is None or down is None:
        return quant.BlockWeights(n1.weight, n2.weight, n1.eps, qkv[0], attn.bqkv, o[0], attn.bo,
                                  input_thresholds=(qkv[1], o[1], 0.0, 0.0))
    return quant.BlockWeights(n1.weight, n2.weight, n1.eps, qkv[0], attn.bqkv, o[0], attn.bo, gu[0],
                              down[0], 2 if ffn.gated else 1, ffn.gate_up_bias, ffn.down_bias, *ffn.codes,
                              input_thresholds=(qkv[1], o[1], gu[1], down[1]))
    # (MiniCPM's scalings are not in that kernel: Transformer._native_blocks leaves such models to the per-op path)


NATIVE_BLOCKS = True  # quantized pre-norm blocks as one native call each, for steps of any length (tests turn
#   it off to compare with the per-op path): one code path for every token, so results do not depend on load


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[Block], final_norm: Norm,
                 lm_head: torch.Tensor, pos_embed: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.embed, self.pos_embed, self.lm_head = embed, pos_embed, lm_head
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.inv_freq = rope_inv_freq(cfg).to(embed.device) if cfg.positional == "rope" else None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' float dtype, fp32 over quantized weights."""
        return torch.float32 if isinstance(self.embed, QuantTensor) else self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def _native_blocks(self) -> list[quant.BlockWeights] | None:
        """Every block's weights for the one-call native block, or None unless all blocks qualify (cached
        until a block's FFN is replaced, as the hybrid executor does)."""
        key = tuple((id(layer.ffn), id(layer.attn.wqkv), id(layer.attn.wo), id(getattr(layer.ffn, "gate_up", None)),
                     id(getattr(layer.ffn, "down", None))) for layer in self.layers)
        if getattr(self, "_native_key", None) != key:
            blocks = [native_block(layer) for layer in self.layers]
            cpu = self.device.type == "cpu" and attn_dtype(self.device, self.dtype) == torch.float32
            cfg = self.config
            cpu = cpu and cfg.embed_scale == cfg.residual_scale == cfg.logit_divisor == 1.0
            self._native_key, self._native = key, blocks if cpu and all(b is not None for b in blocks) else None
        return self._native

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.inv_freq is None:
            return None
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        dtype = attn_dtype(self.device, self.dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: StepBatch, cache: KVCache | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Run the flattened tokens of one step; return float32 logits at `logits_indices` (default: all)."""
        positions = batch.token_positions().to(self.device)
        x = self.embed.dequantize(input_ids) if isinstance(self.embed, QuantTensor) else F.embedding(
            input_ids, self.embed)
        if self.pos_embed is not None:
            x = x + F.embedding(positions + 2, self.pos_embed)  # OPT's learned positions start at offset 2
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale  # MiniCPM's scale_emb
        rope = self._rope(positions)
        blocks = self._native_blocks() if cache is not None and NATIVE_BLOCKS else None
        cfg = self.config
        if blocks is not None:
            tables, token_seqs = batch.tables_tensor, batch.token_seqs()
            _check_tables(batch, cache)
            sparse = None  # input sparsity: decode tokens (one per sequence in this step), all with `prefill`
            if not getattr(self, "input_sparse_prefill", True):
                sparse = torch.tensor([n == 1 for n in batch.lengths], dtype=torch.uint8)[token_seqs]
        elif cache is not None:
            rows = rows_of(batch.tables, batch.starts, batch.lengths, cache.block_size).to(self.device)
        for i, layer in enumerate(self.layers):
            if blocks is not None:
                x = quant.block(x, blocks[i], rope, cache.k[i], cache.v[i], tables, token_seqs, positions,
                                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window, sparse)
                if blocks[i].gate_up is None:  # attention only: the FFN is the layer's own (a sparse one)
                    x = x + layer.ffn_after_attention(x)
            else:
                x = layer(x, rope, batch, cache, i, rows if cache is not None else None, positions)
        if logits_indices is not None:
            x = x[logits_indices]
        if blocks is not None and self.final_norm.kind == "rms" and isinstance(self.lm_head, QuantTensor):
            # the head in a fixed order per token too, whatever the number of rows
            norm = self.final_norm
            return quant.linear(x, self.lm_head, max_native_tokens=x.shape[0], norm=norm.weight, eps=norm.eps)
        x = self.final_norm(x)
        if self.config.logit_divisor != 1.0:
            x = x / self.config.logit_divisor  # MiniCPM: hidden / (hidden_size / dim_model_base)
        return linear(x, self.lm_head).float()

    def forward_sequence(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [L, V] for one sequence without a KV cache (profiling, perplexity)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).flatten()
        return self.forward(ids, StepBatch([[]], [0], [ids.numel()]))


def _check_tables(batch: StepBatch, cache: KVCache) -> None:
    """The native block writes through the block tables unchecked: a table too short for its positions or a
    block id out of range would write outside the cache, so refuse them here, once per step."""
    for table, start, n in zip(batch.tables, batch.starts, batch.lengths):
        in_range = not table or 0 <= min(table) <= max(table) < cache.num_blocks
        if len(table) * cache.block_size < start + n or not in_range:
            raise ValueError(f"a KV block table of {len(table)} blocks cannot hold positions up to {start + n}")
