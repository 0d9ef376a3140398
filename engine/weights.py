"""Checkpoint readers: Hugging Face safetensors (single or sharded) and GGUF, behind one name scheme.

Both readers answer `get(canonical_name)` with a float tensor in transformers' layout (so GGUF q/k rows are
un-permuted back to the rotate-half RoPE order). Tensors are read lazily from memory maps, one at a time,
so a model is converted into hotcold's layout with at most one extra tensor in flight.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.kernels.quant import QuantTensor, from_gguf

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

_HF_LLAMA_GLOBAL = {"embed": "embed_tokens", "final_norm": "norm"}
_HF_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "router": "block_sparse_moe.gate",
}
_MIXTRAL_EXPERT = {"gate": "w1", "down": "w2", "up": "w3"}
_HF_OPT_GLOBAL = {"embed": "decoder.embed_tokens", "pos_embed": "decoder.embed_positions",
                  "final_norm": "decoder.final_layer_norm"}
_HF_OPT_LAYER = {
    "attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm",
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
    "up": "fc1", "down": "fc2",
}
_GGUF_GLOBAL = {"embed": "token_embd", "final_norm": "output_norm", "lm_head": "output"}
_GGUF_LAYER = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
    "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
}


class SafetensorsReader:
    """config.json + model.safetensors (or shards listed in model.safetensors.index.json), memory-mapped."""

    def __init__(self, folder: Path, arch: str):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise HotcoldError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise HotcoldError(f"{folder}: no *.safetensors weights found")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise HotcoldError(f"{path}: shard listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise HotcoldError(f"{path}: cannot read safetensors file ({exc})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        self.arch = arch
        prefix = "model." if any(k.startswith("model.") for k in self._where) else ""
        self._prefix = prefix

    def tensor_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for key, file in self._where.items():
            sl = self._handles[file].get_slice(key)
            out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return out

    def _hf_name(self, name: str) -> str | None:
        opt = self.arch == "opt"
        glob, layer_map = (_HF_OPT_GLOBAL, _HF_OPT_LAYER) if opt else (_HF_LLAMA_GLOBAL, _HF_LLAMA_LAYER)
        if name.startswith("lm_head."):
            return name
        base, _, suffix = name.rpartition(".")
        if base in glob:
            return f"{self._prefix}{glob[base]}.{suffix}"
        match = _LAYER.match(base)
        if not match:
            return None
        idx, part = match.groups()
        layers = "decoder.layers" if opt else "layers"
        if part.startswith("experts."):
            _, expert, which = part.split(".")
            return f"{self._prefix}{layers}.{idx}.block_sparse_moe.experts.{expert}.{_MIXTRAL_EXPERT[which]}.{suffix}"
        return f"{self._prefix}{layers}.{idx}.{layer_map[part]}.{suffix}" if part in layer_map else None

    def get(self, name: str) -> torch.Tensor | None:
        key = self._hf_name(name)
        if key is None or key not in self._where:
            return None
        return self._handles[self._where[key]].get_tensor(key)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation of q/k rows (interleaved RoPE -> rotate-half order)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFReader:
    """A .gguf file through the `gguf` package: `get` dequantizes, `get_quantized` keeps the blocks."""

    def __init__(self, path: Path):
        import gguf

        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise HotcoldError(f"{path}: cannot read GGUF file ({type(exc).__name__}: {exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata = self._read_metadata()
        self.arch = self.metadata.get("general.architecture")
        self.n_head = self.metadata.get(f"{self.arch}.attention.head_count")
        self.n_head_kv = self.metadata.get(f"{self.arch}.attention.head_count_kv") or self.n_head

    def _read_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                meta[key] = field.contents()
            except Exception:  # an exotic field type: skip rather than fail the whole load
                continue
        return meta

    def tensor_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for n, t in self._tensors.items()}

    def _key(self, name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        if base in _GGUF_GLOBAL:
            return f"{_GGUF_GLOBAL[base]}.{suffix}"
        match = _LAYER.match(base)
        if not match or match.group(2) not in _GGUF_LAYER:
            return None
        return f"blk.{match.group(1)}.{_GGUF_LAYER[match.group(2)]}.{suffix}"

    def _tensor(self, name: str):
        key = self._key(name)
        return self._tensors.get(key) if key else None

    def _unpermute_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of q/k back in transformers' order (llama.cpp's converter interleaves them for RoPE)."""
        if self.arch == "llama" and name.endswith((".q.weight", ".k.weight")):
            return _unpermute(rows, self.n_head if ".q." in name else self.n_head_kv).contiguous()
        return rows

    def is_quantized(self, name: str) -> bool:
        tensor = self._tensor(name)
        return tensor is not None and tensor.tensor_type.name not in FLOAT_TYPES

    def get_quantized(self, name: str) -> QuantTensor | None:
        """A quantized tensor kept in its blocks (kernels.quant; types the kernels do not run become Q8_0), in
        transformers' row order; None when the tensor is absent or stored as floats."""
        tensor = self._tensor(name)
        if tensor is None or tensor.tensor_type.name in FLOAT_TYPES:
            return None
        cols = int(tensor.shape[0])  # GGUF lists the contiguous dimension first
        try:
            out = from_gguf(np.asarray(tensor.data), tensor.tensor_type.name, cols)
        except (ValueError, NotImplementedError) as exc:
            raise HotcoldError(f"{tensor.name}: cannot use its {tensor.tensor_type.name} data ({exc}); convert the "
                               "model to Q8_0, Q4_0, Q4_1 or F16 with llama-quantize") from None
        out.data = self._unpermute_rows(name, out.data)
        return out

    def get(self, name: str) -> torch.Tensor | None:
        import gguf

        tensor = self._tensor(name)
        if tensor is None:
            return None
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        data = np.ascontiguousarray(data, dtype=np.float32)
        return self._unpermute_rows(name, torch.from_numpy(data if data.flags.writeable else data.copy()))
