"""GGUF checkpoints (llama.cpp's, and PowerInfer's PWRI variant) through the `gguf` package, answering the
same canonical names as the Hugging Face reader: q/k rows are un-permuted back to the rotate-half RoPE order,
quantized tensors are kept as blocks (`get_quantized`) or dequantized (`get`), and every read is
bounds-checked, so a truncated file is one clear error."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.engine.weights import FLOAT_TYPES, LAYER_NAME
from hotcold.kernels.quant import NATIVE_TYPES, QuantTensor, from_gguf

_GGUF_GLOBAL = {"embed": "token_embd", "final_norm": "output_norm", "lm_head": "output"}
_GGUF_LAYER = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
    "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    # PowerInfer GGUFs: down stored neuron-major ([I, H] rows), and the layer's predictor
    "down_t": "ffn_down_t", "fc1": "fc1", "fc2": "fc2",
}
POWERINFER_MAGIC = int.from_bytes(b"PWRI", "little")  # in place of GGUF's magic (convert-hf-to-powerinfer-gguf.py)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation of q/k rows (interleaved RoPE -> rotate-half order)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _release(mapped: np.ndarray) -> None:
    """The file pages a tensor was copied from leave resident memory (streamed loading: kernels.native)."""
    from hotcold.kernels.native import release_mapped

    release_mapped(mapped.ctypes.data, mapped.nbytes)


def _streamed_copy(mapped: np.ndarray, chunk: int = 8 << 20) -> np.ndarray:
    """This process's own copy of a memory-mapped tensor, taken `chunk` bytes at a time, each piece's file pages
    dropped once copied: a tensor's file pages never sit resident beside its whole copy (a 113 MB head was
    the load's peak, 2 x 113 MB at once)."""
    if not mapped.flags.c_contiguous:
        out = np.ascontiguousarray(mapped)
        _release(mapped)
        return out
    out = np.empty_like(mapped)
    src, dst = mapped.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)
    for start in range(0, src.size, chunk):
        dst[start: start + chunk] = src[start: start + chunk]
        _release(src[start: start + chunk])
    return out


class _Damaged(Exception):
    """A GGUF file that ends before what its own header describes."""


def _checked_gguf_reader(path: Path) -> Any:
    """gguf.GGUFReader with every read bounds-checked against the file's size: a truncated or corrupt file is
    reported with the bytes expected and found, not as numpy's "cannot reshape array of size ..."."""
    import gguf

    class Checked(gguf.GGUFReader):
        powerinfer = False  # the file is PowerInfer's GGUF variant (magic PWRI)

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _Damaged(f"truncated or corrupt: its header runs past the end of the file (expected at "
                               f"least {end} bytes, found {len(self.data)})")
            value = super()._get(offset, dtype, count, override_order)
            if int(offset) == 0 and int(count) == 1 and int(value[0]) == POWERINFER_MAGIC:
                self.powerinfer = True  # otherwise GGUF v3 as it is
                return np.array([gguf.GGUF_MAGIC], dtype=value.dtype)
            return value

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            end = 0
            for field in fields:
                _, _, _, dims, raw_type, offset = field.parts
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError):
                    raise _Damaged(f"corrupt: tensor {bytes(field.parts[1]).decode(errors='replace')!r} has "
                                   f"unknown type {int(raw_type[0])}") from None
                nbytes = int(np.prod(dims.astype(np.int64))) * type_size // block
                end = max(end, int(start_offs) + int(offset[0]) + nbytes)
            if end > len(self.data):
                raise _Damaged(f"truncated: its tensors need {end} bytes, found {len(self.data)} "
                               f"({end - len(self.data)} missing)")
            super()._build_tensors(start_offs, fields)

    return Checked(str(path))


class GGUFReader:
    """A .gguf file through the `gguf` package: `get` dequantizes, `get_quantized` keeps the blocks."""

    def __init__(self, path: Path):
        try:
            self._reader = _checked_gguf_reader(path)
        except _Damaged as exc:
            raise HotcoldError(f"{path}: cannot read GGUF file: {exc}") from None
        except Exception as exc:
            raise HotcoldError(f"{path}: cannot read GGUF file, corrupt ({type(exc).__name__}: {exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.powerinfer = self._reader.powerinfer
        self.metadata = self._read_metadata()
        # gguf's reader holds every metadata field as numpy views, two per vocabulary entry and merge: 166 MB
        # for a 49152-token vocabulary, resident through the load. Their contents are in self.metadata now.
        self._reader.fields = {}
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

    def forget_vocabulary(self) -> None:
        """Drop the tokenizer's arrays from the metadata (42 MB of Python objects for 49152 tokens and their
        merges) once a tokenizer has been made from them."""
        for key in [k for k, v in self.metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list)]:
            del self.metadata[key]
        gc.collect()
        from hotcold.kernels.native import release_heap

        release_heap()

    def tensor_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for n, t in self._tensors.items()}

    def _key(self, name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        if base in _GGUF_GLOBAL:
            return f"{_GGUF_GLOBAL[base]}.{suffix}"
        match = LAYER_NAME.match(base)
        if not match or match.group(2) not in _GGUF_LAYER:
            return None
        return f"blk.{match.group(1)}.{_GGUF_LAYER[match.group(2)]}.{suffix}"

    def _tensor(self, name: str):
        key = self._key(name)
        return self._tensors.get(key) if key else None

    def _unpermute_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of q/k back in transformers' order (llama.cpp's converter interleaves them for RoPE)."""
        if self.arch in ("llama", "bamboo") and name.endswith((".q.weight", ".k.weight")):
            return _unpermute(rows, self.n_head if ".q." in name else self.n_head_kv).contiguous()
        return rows

    def has(self, name: str) -> bool:
        return self._tensor(name) is not None

    def info(self, name: str) -> tuple[str, tuple[int, ...], str] | None:
        """A canonical tensor's stored name, shape ([out, in]) and type, read from the header; None if absent."""
        t = self._tensor(name)
        return None if t is None else (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name)

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
        qtype = tensor.tensor_type.name
        try:
            if qtype in NATIVE_TYPES:  # the blocks as they are: copied out chunk by chunk
                out = from_gguf(_streamed_copy(np.asarray(tensor.data)), qtype, cols, copy=False)
            else:
                out = from_gguf(np.asarray(tensor.data), qtype, cols)
        except (ValueError, NotImplementedError) as exc:
            advice = "the file is corrupt" if qtype in NATIVE_TYPES else (
                "convert the model to Q8_0, Q4_0, Q4_1 or F16 with llama-quantize")
            raise HotcoldError(f"{tensor.name}: cannot use its {qtype} data ({exc}); {advice}") from None
        _release(tensor.data)
        out.data = self._unpermute_rows(name, out.data)
        return out

    def get(self, name: str) -> torch.Tensor | None:
        import gguf

        tensor = self._tensor(name)
        if tensor is None:
            return None
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not np.shares_memory(data, tensor.data):
            _release(tensor.data)
        return self._unpermute_rows(name, torch.from_numpy(data if data.flags.writeable else data.copy()))
