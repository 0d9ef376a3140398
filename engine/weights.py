"""Checkpoint readers: Hugging Face safetensors or pytorch_model*.bin (single or sharded) and GGUF, behind one
name scheme.

Both readers answer `get(canonical_name)` with a float tensor in transformers' layout (so GGUF q/k rows are
un-permuted back to the rotate-half RoPE order). Tensors are read lazily from memory maps, one at a time,
so a model is converted into hotcold's layout with at most one extra tensor in flight.
"""

from __future__ import annotations

import gc
import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hotcold.engine.errors import HotcoldError
from hotcold.kernels.quant import NATIVE_TYPES, QuantTensor, from_gguf

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
    # PowerInfer GGUFs: down stored neuron-major ([I, H] rows), and the layer's predictor
    "down_t": "ffn_down_t", "fc1": "fc1", "fc2": "fc2",
}
POWERINFER_MAGIC = int.from_bytes(b"PWRI", "little")  # in place of GGUF's magic (convert-hf-to-powerinfer-gguf.py)


_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TORCH_DTYPE_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def _weight_files(folder: Path) -> tuple[str, list[str]]:
    """Which weights a folder holds: safetensors first (never unpickled), then pytorch_model*.bin."""
    for kind, index_name, pattern in (("safetensors", "model.safetensors.index.json", "*.safetensors"),
                                      ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                if not all(isinstance(name, str) for name in names):
                    raise TypeError("its weight_map values are not all file names")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise HotcoldError(f"{index}: not a valid weights index ({exc})") from None
            # no shard name may leave the folder ("../../etc/passwd"); symlinks out of it (HF cache blobs) may
            outside = [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]
            if outside:
                raise HotcoldError(f"{index}: refused: shard {outside[0]!r} lies outside the model folder")
            return kind, names
        files = sorted(p.name for p in folder.glob(pattern))
        if files:
            return kind, files
    raise HotcoldError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file in one line with the bytes expected and found (the
    library's own errors name neither, and a short file otherwise fails later as a bad reshape)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HotcoldError(f"{path}: truncated safetensors file: expected at least 8 bytes, found {size}")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise HotcoldError(f"{path}: truncated or corrupt safetensors file: its header says {n} header bytes, "
                               f"so expected at least {8 + n} bytes, found {size}")
        try:
            header = json.loads(f.read(n))
            entries = [(k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items()
                       if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HotcoldError(f"{path}: corrupt safetensors file: unreadable header ({exc})") from None
    end = 0
    for name, dtype, shape, (begin, stop) in entries:
        want = math.prod(shape) * _ST_ITEMSIZE.get(dtype, 0)
        if stop < begin or (dtype in _ST_ITEMSIZE and stop - begin != want):
            raise HotcoldError(f"{path}: corrupt safetensors file: tensor {name!r} ({dtype} {list(shape)}) needs "
                               f"{want} bytes, its header gives it {stop - begin}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise HotcoldError(f"{path}: truncated safetensors file: expected {8 + n + end} bytes, found {size} "
                           f"({8 + n + end - size} missing)")


class _SafetensorsFile:
    """One safetensors file, checked, memory-mapped by the safetensors library."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        check_safetensors(path)
        try:
            self._handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise HotcoldError(f"{path}: cannot read safetensors file ({exc})") from None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self._handle.get_slice(key)
        return tuple(sl.get_shape()), str(sl.get_dtype())

    def get(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)


def load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model*.bin state dict through torch's weights-only unpickler: tensors, containers and plain
    values only, so a pickle that asks for a callable (os.system, ...) is refused before anything runs.
    Memory-mapped when the file is in torch's zip format; the pre-1.6 format is read into memory."""
    def load(mmap: bool) -> Any:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: errors stay one line
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            state = load(mmap=False)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "not a tensor").rstrip(".")
        raise HotcoldError(f"{path}: refused to unpickle: it holds something other than tensors ({reason}); "
                           "hotcold reads .bin weights only through torch's weights-only unpickler") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HotcoldError(f"{path}: cannot read PyTorch checkpoint, truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HotcoldError(f"{path}: not a state dict of tensors")
    return state


class _TorchBinFile:
    """One pytorch_model*.bin file, loaded weights-only (see load_torch_bin)."""

    def __init__(self, path: Path):
        self._tensors = load_torch_bin(path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        t = self._tensors[key]
        return tuple(t.shape), _TORCH_DTYPE_NAME.get(t.dtype, str(t.dtype))

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class HFReader:
    """config.json + weights: model.safetensors or shards listed in model.safetensors.index.json (preferred when
    present), else pytorch_model.bin or shards listed in pytorch_model.bin.index.json; memory-mapped."""

    def __init__(self, folder: Path, arch: str):
        self._files: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        self._where: dict[str, str] = {}
        kind, names = _weight_files(folder)
        for name in names:
            path = folder / name
            if not path.exists():
                raise HotcoldError(f"{path}: shard listed in the index is missing")
            handle = _SafetensorsFile(path) if kind == "safetensors" else _TorchBinFile(path)
            self._files[name] = handle
            for key in handle.keys():
                self._where[key] = name
        self.arch = arch
        prefix = "model." if any(k.startswith("model.") for k in self._where) else ""
        self._prefix = prefix

    def tensor_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {key: self._files[file].info(key) for key, file in self._where.items()}

    def info(self, name: str) -> tuple[str, tuple[int, ...], str] | None:
        """A canonical tensor's stored name, shape ([out, in]) and dtype, read from the header; None if absent."""
        key = self._hf_name(name)
        return (key, *self._files[self._where[key]].info(key)) if key in self._where else None

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
        return self._files[self._where[key]].get(key)


SafetensorsReader = HFReader  # the name it had before it read .bin checkpoints too


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
        match = _LAYER.match(base)
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
