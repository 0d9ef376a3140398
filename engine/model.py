"""The transformer in plain PyTorch: one block type for every supported architecture.

A step runs the flattened tokens of several sequences at once ([T, hidden]); only attention looks at
sequence boundaries (`StepBatch`). The FFN is a replaceable module per layer: `DenseFFN` (engine/layers.py), sparse
versions elsewhere, all with `activations(x) -> h` and `project_down(h) -> y`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hotcold.engine.cache import KVCache, rows_of
from hotcold.engine.config import ModelConfig
from hotcold.engine.input_sparsity import SparseInput
from hotcold.engine.layers import Norm, QuantFFN, linear
from hotcold.kernels import block as block_kernel
from hotcold.kernels import quant
from hotcold.kernels.input_sparse import InputMajor
from hotcold.kernels.qrows import QRows
from hotcold.kernels.quant import QuantTensor


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

    def tables_on(self, device: torch.device) -> torch.Tensor:
        """tables_tensor on `device`, copied once per step: a copy from pageable memory waits for the device's
        queue, so one per layer would stall the host at every layer of a GPU step."""
        copies = self.__dict__.setdefault("_tables_on", {})
        if device not in copies:
            copies[device] = self.tables_tensor.to(device)
        return copies[device]


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
            tables = batch.tables_on(x.device)
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


def native_block(block: Block) -> block_kernel.BlockWeights | None:
    """The block's weights for kernels.block.block (one native call per block), or None where that kernel
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
        return block_kernel.BlockWeights(n1.weight, n2.weight, n1.eps, qkv[0], attn.bqkv, o[0], attn.bo,
                                  input_thresholds=(qkv[1], o[1], 0.0, 0.0))
    return block_kernel.BlockWeights(n1.weight, n2.weight, n1.eps, qkv[0], attn.bqkv, o[0], attn.bo, gu[0],
                              down[0], 2 if ffn.gated else 1, ffn.gate_up_bias, ffn.down_bias, *ffn.codes,
                              input_thresholds=(qkv[1], o[1], gu[1], down[1]))
    # (MiniCPM's scalings are not in that kernel: Transformer._native_blocks leaves such models to the per-op path)


NATIVE_BLOCKS = True  # quantized pre-norm blocks as one native call each, for steps of any length (tests turn
#   it off to compare with the per-op path): one code path for every token, so results do not depend on load


def _weights_key(layer: Block) -> tuple[int, ...]:
    """Which FFN and matrices a block holds now (their ids): read through the modules' dicts, since
    nn.Module's attribute lookup, 150 times per step, took 128 us of a default-model token (13 us now)."""
    ffn, attn = layer._modules["ffn"], layer._modules["attn"]
    held = ffn.__dict__
    return id(ffn), id(attn.wqkv), id(attn.wo), id(held.get("gate_up")), id(held.get("down"))


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
        """The activations' dtype: the weights' float dtype, fp32 over quantized weights on the CPU, the norms'
        over quantized rows on a GPU (engine.hybrid.move_dense_parts)."""
        if isinstance(self.embed, QRows):
            return self.final_norm.weight.dtype
        return torch.float32 if isinstance(self.embed, QuantTensor) else self.embed.dtype

    @property
    def quantized(self) -> bool:
        """Whether any matrix is held quantized (GGUF blocks, or their rows on a GPU side); a GGUF may keep its
        embedding or attention in F16/F32 beside them. Such a model's norms and activations run in float32
        on the CPU and bfloat16 on a GPU side, whatever its float tensors' dtype."""
        held = (QuantTensor, QRows)
        blocks = [layer for layer in self.layers if isinstance(layer, Block)]
        matrices = [self.embed, self.lm_head] + [w for b in blocks for w in (b.attn.wqkv, b.attn.wo)]
        return any(isinstance(w, held) for w in matrices) or any(isinstance(b.ffn, QuantFFN) for b in blocks)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def _native_blocks(self) -> list[block_kernel.BlockWeights] | None:
        """Every block's weights for the one-call native block, or None unless all blocks qualify (cached
        until a block's FFN is replaced, as the hybrid executor does). Not for a model off the CPU, nor for layers
        that are not Blocks (a benchmark's wrapper): those run through their own forward."""
        if self.device.type != "cpu" or not all(isinstance(layer, Block) for layer in self.layers):
            return None
        key = tuple(_weights_key(layer) for layer in self.layers)
        if getattr(self, "_native_key", None) != key:
            blocks = [native_block(layer) for layer in self.layers]
            cfg = self.config
            plain = cfg.embed_scale == cfg.residual_scale == cfg.logit_divisor == 1.0
            self._native_key, self._native = key, blocks if plain and all(b is not None for b in blocks) else None
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
        if isinstance(self.embed, QuantTensor):
            x = self.embed.dequantize(input_ids)
        elif isinstance(self.embed, QRows):  # the rows looked up, dequantized where they are
            x = self.embed[input_ids].to(self.dtype)
        else:
            x = F.embedding(input_ids, self.embed)
        if self.pos_embed is not None:
            x = x + F.embedding(positions + 2, self.pos_embed)  # OPT's learned positions start at offset 2
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale  # MiniCPM's scale_emb
        rope = self._rope(positions)
        blocks = self._native_blocks() if cache is not None and NATIVE_BLOCKS else None
        cfg = self.config
        if blocks is not None:
            token_seqs = batch.token_seqs()
            _check_tables(batch, cache)
            sparse = None  # input sparsity: decode tokens (one per sequence in this step), all with `prefill`
            if not getattr(self, "input_sparse_prefill", True):
                sparse = torch.tensor([n == 1 for n in batch.lengths], dtype=torch.uint8)[token_seqs]
            step = block_kernel.StepInputs(rope, batch.tables_tensor, token_seqs, positions, cfg.head_dim, sparse)
        elif cache is not None:
            rows = rows_of(batch.tables, batch.starts, batch.lengths, cache.block_size).to(self.device)
        for i, layer in enumerate(self.layers):
            if blocks is not None:
                x = block_kernel.block(x, blocks[i], step, cache.k[i], cache.v[i], cfg.num_heads, cfg.num_kv_heads,
                                       cfg.head_dim, cfg.sliding_window, in_place=i > 0)
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
