"""Model loading: resolve a model spec, read its config and weights, build the Transformer in hotcold's layout."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hotcold.engine import config as configs
from hotcold.engine.config import ModelConfig
from hotcold.engine.errors import HotcoldError
from hotcold.engine.gguf_weights import GGUFReader
from hotcold.engine.layers import DenseFFN, MoEFFN, Norm, QuantFFN
from hotcold.engine.model import Attention, Block, Transformer
from hotcold.engine.plan import compute_fingerprint
from hotcold.engine.tokenizer import Tokenizer, from_gguf_metadata, from_hf_folder
from hotcold.engine.weights import HFReader
from hotcold.kernels import calibrate, native, quant
from hotcold.kernels.quant import QUANTIZE_TYPES, QuantTensor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_NOT_FLOAT = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")  # stored dtypes refused for weights


@dataclass
class GenerationDefaults:
    """generation_config.json's sampling defaults (the server and CLI fall back to them)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    generation: GenerationDefaults
    source: str
    fingerprint: str
    tensors: dict[str, tuple[tuple[int, ...], str]]

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids) | set(self.generation.eos_token_ids)


def resolve_model_path(spec: str | Path | None) -> Path:
    if spec in (None, "", "default"):
        from hotcold.engine.default_model import ensure_default_model

        return ensure_default_model()
    path = Path(spec).expanduser()
    if not path.exists():
        raise HotcoldError(f"model {str(spec)!r} not found (give a Hugging Face folder, a .gguf file, or 'default')")
    if path.is_dir() and not (path / "config.json").exists():
        raise HotcoldError(f"{path}: not a model folder (no config.json)")
    if path.is_file() and path.suffix != ".gguf":
        raise HotcoldError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    return path


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU; on the CPU what the calibration chose for this machine (kernels.calibrate: bfloat16
    unless torch lacks a fast bf16 product here). The logits checks against transformers run in float32."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    from hotcold.kernels import calibrate

    return calibrate.default_dtype()


def model_fingerprint(cfg: ModelConfig, tensors: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """A hash of the model's shape and its checkpoint's tensor names/shapes/dtypes: plans are bound to it."""
    shape = {k: v for k, v in cfg.to_dict().items() if k not in ("eos_token_ids", "bos_token_id")}
    return compute_fingerprint(shape, tensors)


def load_model(spec: str | Path = "default", dtype: str | torch.dtype | None = None, device: str = "cpu",
               activation: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a Hugging Face folder, a .gguf file or the default model onto `device`.

    On the CPU, with no `dtype` given, a GGUF's quantized matrices stay in their blocks (kernels.quant) and
    activations run in float32; an explicit `dtype` dequantizes them (what the sparse executor and the
    profiler need). `quantize` (Q8_0, Q4_0, Q4_1) quantizes a checkpoint's float matrices at load."""
    path = resolve_model_path(spec)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HotcoldError(f"unknown dtype {dtype!r} (choose from float32, bfloat16, float16)")
        dtype = DTYPES[dtype]
    if quantize is not None:
        quantize = quantize.upper()
        if quantize not in QUANTIZE_TYPES:
            raise HotcoldError(f"unknown --quantize {quantize.lower()!r} (choose from "
                               f"{', '.join(t.lower() for t in QUANTIZE_TYPES)})")
    cpu = torch.device(device).type == "cpu"
    if quantize and not cpu:
        raise HotcoldError("--quantize keeps the model on the CPU: use --device cpu, or give --plan for quantized "
                           "hot rows on the GPU")
    keep_blocks = dtype is None and cpu and native.load() is not None
    if quantize and native.load() is None:
        raise HotcoldError("--quantize needs the native CPU kernels (a C compiler, HOTCOLD_NATIVE unset)")
    dtype = dtype or default_dtype(device)
    cfg, reader = _open(path, activation)
    if path.suffix == ".gguf":
        with _naming(path):
            tokenizer = from_gguf_metadata(reader.metadata)
        reader.forget_vocabulary()  # the tokenizer holds it now: not resident beside the weights' copies
        gen = GenerationDefaults()
    else:
        gen = _generation_defaults(path)
        tokenizer = from_hf_folder(path, gen.eos_token_ids)
    tensors = reader.tensor_names()
    with native.large_frees_returned():
        model = build_model(cfg, reader, dtype, torch.device(device), keep_blocks=keep_blocks, quantize=quantize)
        _tile_products(model)
    for weight in _large_weights(model):
        native.use_huge_pages(weight)
    native.release_heap()
    return LoadedModel(model, tokenizer, cfg, gen, str(path), model_fingerprint(cfg, tensors), tensors)


def holds_quantized_ffn(spec: str | Path) -> bool:
    """Whether a checkpoint stores its FFN matrices in quantized GGUF blocks (read from the header alone)."""
    path = resolve_model_path(spec)
    return path.suffix == ".gguf" and GGUFReader(path).is_quantized("layers.0.up.weight")


def model_config(spec: str | Path, activation: str | None = None) -> ModelConfig:
    """A model's configuration alone (its weights are not read)."""
    return _open(resolve_model_path(spec), activation)[0]


def _open(path: Path, activation: str | None) -> tuple[ModelConfig, HFReader | GGUFReader]:
    if path.suffix == ".gguf":
        reader = GGUFReader(path)
        with _naming(path):
            cfg = configs.from_gguf_metadata(reader.metadata, activation, powerinfer=reader.powerinfer)
        cfg.mlp_bias = "blk.0.ffn_up.bias" in reader.tensor_names()  # optional in llama.cpp's llama too
        return cfg, reader
    raw = _json_object(path / "config.json")
    with _naming(path / "config.json"):
        cfg = configs.from_hf_config(raw, activation)
    return cfg, HFReader(path, cfg.arch)


@contextmanager
def _naming(source: Path) -> Iterator[None]:
    """The config's errors name the field; this puts the file in front."""
    try:
        yield
    except HotcoldError as exc:
        raise HotcoldError(f"{source}: {exc}") from None


def _json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file as an object, or one line naming the file (json's errors name none)."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise HotcoldError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise HotcoldError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def memory_report(model: Transformer) -> str:
    """Resident memory of this process beside the bytes of the model's tensors (and GPU memory in use), for
    the start-up log: what a plan's budget promised against what the process holds."""
    def tensors(obj, depth: int = 0):  # a module's tensors, and those of plain objects it holds (a side's rows)
        for v in vars(obj).values():
            if isinstance(v, (torch.Tensor, QuantTensor)):
                yield v.data if isinstance(v, QuantTensor) else v
            elif callable(getattr(v, "tensors", None)):  # an input-major matrix (kernels.input_sparse)
                yield from v.tensors()
            elif depth == 0 and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type)):
                yield from tensors(v, 1)
            elif isinstance(v, (list, tuple)):
                yield from (x.data if isinstance(x, QuantTensor) else x for x in v
                            if isinstance(x, (torch.Tensor, QuantTensor)))

    seen, weights = set(), 0
    for t in [*model.parameters(), *model.buffers()] + [t for m in model.modules() for t in tensors(m)]:
        storage = t.untyped_storage()  # views (a side's gate and up rows) share their tensor's storage
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            weights += storage.nbytes()
    rss = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.memory_allocated() / 1e6:.0f} MB allocated" if torch.cuda.is_initialized() else ""
    return f"{rss / 1e6:.0f} MB resident for {weights / 1e6:.0f} MB of model tensors{gpu}"


def _tile_products(model: Transformer) -> None:
    """The Q4_0/Q4_1 matrices that dense products read, re-laid in tiles of four rows (kernels/tiles.c:
    lossless, the same bytes) where this CPU has the kernel for them and the calibration measured it faster:
    one register then serves four rows, read as one stream. What gathers rows or rearranges them (a plan's
    sparse FFN, input sparsity) untiles its own matrices; HOTCOLD_TILES=0 keeps the file's rows."""
    if os.environ.get("HOTCOLD_TILES", "1") == "0" or not calibrate.current().tiles:  # (or slower here)
        return

    def tiled(w):
        return quant.tile(w, in_place=True) if isinstance(w, QuantTensor) and quant.tiles_supported(w.qtype) else w

    for block in model.layers:
        block.attn.wqkv, block.attn.wo = tiled(block.attn.wqkv), tiled(block.attn.wo)
        if isinstance(block.ffn, QuantFFN) and block.ffn.down is not None:  # (down_t alone: gathered rows)
            block.ffn.gate_up, block.ffn.down = tiled(block.ffn.gate_up), tiled(block.ffn.down)
    head = tiled(model.lm_head)
    model.embed = head if model.lm_head is model.embed else tiled(model.embed)
    model.lm_head = head


def _large_weights(model: Transformer) -> list[torch.Tensor]:
    """The matrices read every token: what the native kernels stream (they want 2 MiB pages)."""
    out = [model.embed, model.lm_head]
    for block in model.layers:
        out += [block.attn.wqkv, block.attn.wo]
        ffns = block.ffn.experts if isinstance(block.ffn, MoEFFN) else [block.ffn]
        out += [t for ffn in ffns for t in (ffn.gate_up, ffn.down_t if getattr(ffn, "down", None) is None
                                                           else ffn.down)]
    return [w.data if isinstance(w, QuantTensor) else w for w in out]


def _generation_defaults(folder: Path) -> GenerationDefaults:
    path = folder / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    raw = _json_object(path)
    eos = raw.get("eos_token_id")
    return GenerationDefaults(
        temperature=raw.get("temperature") if raw.get("do_sample") else None,
        top_p=raw.get("top_p") if raw.get("do_sample") else None,
        top_k=raw.get("top_k") if raw.get("do_sample") else None,
        repetition_penalty=raw.get("repetition_penalty"),
        eos_token_ids=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
    )


def build_model(cfg: ModelConfig, reader: HFReader | GGUFReader, dtype: torch.dtype,
                device: torch.device, keep_blocks: bool = False, quantize: str | None = None) -> Transformer:
    """Convert tensor by tensor into hotcold's layout (fused qkv and gate/up, down transposed; quantized
    matrices keep their blocks with `keep_blocks`, float ones are quantized to `quantize`)."""
    _check_tensors(cfg, reader)
    blocks = keep_blocks and isinstance(reader, GGUFReader) and any(
        reader.is_quantized(n) for n in ("layers.0.up.weight", "layers.0.q.weight", "embed.weight"))
    if blocks or quantize:
        dtype = torch.float32  # activations, norms and biases next to quantized matrices

    def matrix(name: str, required: bool = True) -> torch.Tensor | QuantTensor | None:
        """A weight matrix: its GGUF blocks, or quantized from floats, or floats in `dtype`."""
        if blocks and (kept := reader.get_quantized(name)) is not None:
            return kept
        t = get(name, required)
        if quantize and t is not None and t.dim() == 2 and t.shape[1] % 32 == 0:
            return quant.quantize(t, quantize)
        return t

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        tensor = reader.get(name)
        if tensor is None:
            if required:
                raise HotcoldError(f"checkpoint lacks tensor {name!r} (arch {cfg.arch})")
            return None
        return tensor.to(device=device, dtype=dtype)

    def norm(prefix: str) -> Norm:
        bias = get(f"{prefix}.bias", required=False) if cfg.norm == "layer" else None
        return Norm(cfg.norm, get(f"{prefix}.weight"), bias, cfg.norm_eps)

    def ffn(prefix: str) -> DenseFFN | QuantFFN:
        bias = cfg.mlp_bias
        # PowerInfer GGUFs store down neuron-major (`ffn_down_t`, [I, H]) and no `ffn_down`
        transposed = isinstance(reader, GGUFReader) and reader.has(f"{prefix}.down_t.weight") and not reader.has(
            f"{prefix}.down.weight")
        if blocks or quantize:
            mats = [matrix(f"{prefix}.{n}.weight") for n in (("gate", "up") if cfg.gated else ("up",))]
            down = matrix(f"{prefix}.down_t.weight" if transposed else f"{prefix}.down.weight")
            if all(isinstance(m, QuantTensor) for m in [*mats, down]):
                mats = _same_type(mats)
                return QuantFFN(cfg.activation, mats[-1], None if transposed else down,
                                gate=mats[0] if cfg.gated else None, down_t=down if transposed else None,
                                up_bias=get(f"{prefix}.up.bias", bias),
                                gate_bias=get(f"{prefix}.gate.bias", bias and cfg.gated),
                                down_bias=get(f"{prefix}.down.bias", bias), gelu_approximate=cfg.gelu_approximate,
                                threshold=cfg.activation_threshold)
        down_t = get(f"{prefix}.down_t.weight") if transposed else get(f"{prefix}.down.weight").t().contiguous()
        return DenseFFN(cfg.activation, get(f"{prefix}.up.weight"), down_t,
                        gate=get(f"{prefix}.gate.weight") if cfg.gated else None,
                        up_bias=get(f"{prefix}.up.bias", bias),
                        gate_bias=get(f"{prefix}.gate.bias", bias and cfg.gated),
                        down_bias=get(f"{prefix}.down.bias", bias), gelu_approximate=cfg.gelu_approximate,
                        threshold=cfg.activation_threshold)

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        wqkv = _cat_rows([matrix(f"{p}.{n}.weight") for n in "qkv"])
        bqkv = torch.cat([get(f"{p}.{n}.bias") for n in "qkv"]) if cfg.qkv_bias else None
        attn = Attention(cfg, wqkv, bqkv, matrix(f"{p}.o.weight"), get(f"{p}.o.bias") if cfg.o_bias else None)
        if cfg.num_experts:
            experts = [ffn(f"{p}.experts.{e}") for e in range(cfg.num_experts)]
            mlp = MoEFFN(get(f"{p}.router.weight"), experts, cfg.num_experts_per_tok)
        else:
            mlp = ffn(p)
        layers.append(Block(norm(f"{p}.attn_norm"), attn, norm(f"{p}.ffn_norm"), mlp, cfg.pre_norm,
                            cfg.residual_scale))
    embed = matrix("embed.weight")
    lm_head = None if cfg.tie_word_embeddings else matrix("lm_head.weight", required=False)
    if lm_head is None:
        cfg.tie_word_embeddings = True  # GGUF models without output.weight share the embedding
        lm_head = embed
    pos = get("pos_embed.weight") if cfg.positional == "learned" else None
    return Transformer(cfg, embed, layers, norm("final_norm"), lm_head, pos).eval()


def _check_tensors(cfg: ModelConfig, reader: HFReader | GGUFReader) -> None:
    """Every tensor the model reads has the shape its config implies and a float (or GGUF block) type, checked
    from the headers before any is read: a wrong one otherwise fails mid-run as a bad reshape or an index out of
    range, or runs, integers cast to floats."""
    for layer in range(-1, cfg.num_layers):  # -1: the tensors outside the layers
        found = [(info, shape) for name, shape in _expected_shapes(cfg, layer).items() if (info := reader.info(name))]
        if not found and layer >= 0:
            break  # a layer the checkpoint lacks (a block_count of 2**32 - 1): build_model names its tensor
        for (stored, got, dtype), shape in found:
            if dtype in _NOT_FLOAT:
                raise HotcoldError(f"tensor {stored} is {dtype}: weights must be floating point (or GGUF quantized)")
            if got != shape:
                raise HotcoldError(f"tensor {stored} has shape {list(got)}, the config implies {list(shape)}")


def _expected_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one layer (the others for -1) the engine may read, by canonical name, with the shape the
    config implies in transformers' [out, in] layout."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if layer < 0:
        return {"embed.weight": (cfg.vocab_size, hidden), "lm_head.weight": (cfg.vocab_size, hidden),
                "pos_embed.weight": (cfg.max_position_embeddings + 2, hidden),  # OPT's positions start at 2
                "final_norm.weight": (hidden,), "final_norm.bias": (hidden,)}
    p = f"layers.{layer}"
    out = {f"{p}.{n}.{kind}": (hidden,) for n in ("attn_norm", "ffn_norm") for kind in ("weight", "bias")}
    if cfg.num_experts:
        out[f"{p}.router.weight"] = (cfg.num_experts, hidden)
    ffns = [f"{p}.experts.{e}" for e in range(cfg.num_experts)] or [p]
    mats = [(f"{p}.{n}", rows, cols) for n, rows, cols in (("q", q, hidden), ("k", kv, hidden), ("v", kv, hidden),
                                                            ("o", hidden, q))]
    mats += [(f"{f}.{n}", rows, cols) for f in ffns for n, rows, cols in (
        ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter))]
    if not cfg.num_experts:
        mats.append((f"{p}.down_t", inter, hidden))  # PowerInfer's down, stored neuron-major
    for prefix, rows, cols in mats:
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = (rows, cols), (rows,)
    return out


def _same_type(mats: list[torch.Tensor | QuantTensor]) -> list[QuantTensor]:
    """Quantized matrices that are fused must share a block type: mixed ones (a Q4_K_M file's Q4_K and Q6_K)
    go to Q8_0, which holds every one of them almost exactly."""
    if len({m.qtype for m in mats}) == 1:
        return mats
    return [m if m.qtype == "Q8_0" else quant.quantize(m.dequantize(), "Q8_0") for m in mats]


def _cat_rows(mats: list[torch.Tensor | QuantTensor]) -> torch.Tensor | QuantTensor:
    """q, k and v stacked into one matrix (one product), quantized when all three are."""
    if all(isinstance(m, QuantTensor) for m in mats):
        return quant.concat(_same_type(mats))
    return torch.cat([m.dequantize() if isinstance(m, QuantTensor) else m for m in mats])
