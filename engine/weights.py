"""Hugging Face checkpoints: safetensors or pytorch_model*.bin, single or sharded, behind one name scheme
(GGUF files: engine/gguf_weights.py, the same names).

`get(canonical_name)` answers a float tensor in transformers' layout. Tensors are read lazily from memory maps,
one at a time, so a model is converted into hotcold's layout with at most one extra tensor in flight.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from hotcold.engine.errors import HotcoldError

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")

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
        match = LAYER_NAME.match(base)
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
