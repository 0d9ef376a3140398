"""Model loading: resolve a model spec, read its config and weights, build the Transformer in hotcold's layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hotcold.engine import config as configs
from hotcold.engine.config import ModelConfig
from hotcold.engine.errors import HotcoldError
from hotcold.engine.model import Attention, Block, DenseFFN, MoEFFN, Norm, Transformer
from hotcold.engine.plan import compute_fingerprint
from hotcold.engine.tokenizer import Tokenizer, from_gguf_metadata, from_hf_folder
from hotcold.engine.weights import GGUFReader, SafetensorsReader
from hotcold.kernels import native

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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
    """bfloat16 on a GPU and on the CPU too: on the 2-core AVX-512 machine it decodes the default model 2.2x
    faster than float32 (benchmarks/RESULTS.md) at the same held-out perplexity (14.363 vs 14.365).
    The logits checks against transformers run in float32 (`--dtype float32`)."""
    return torch.bfloat16


def model_fingerprint(cfg: ModelConfig, tensors: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """A hash of the model's shape and its checkpoint's tensor names/shapes/dtypes: plans are bound to it."""
    shape = {k: v for k, v in cfg.to_dict().items() if k not in ("eos_token_ids", "bos_token_id")}
    return compute_fingerprint(shape, tensors)


def load_model(spec: str | Path = "default", dtype: str | torch.dtype | None = None, device: str = "cpu",
               activation: str | None = None) -> LoadedModel:
    """Load a Hugging Face folder, a .gguf file or the default model onto `device`."""
    path = resolve_model_path(spec)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HotcoldError(f"unknown dtype {dtype!r} (choose from float32, bfloat16, float16)")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    if path.suffix == ".gguf":
        reader = GGUFReader(path)
        cfg = configs.from_gguf_metadata(reader.metadata, activation)
        tokenizer = from_gguf_metadata(reader.metadata)
        gen = GenerationDefaults()
    else:
        try:
            raw = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise HotcoldError(f"{path / 'config.json'}: invalid JSON ({exc})") from None
        cfg = configs.from_hf_config(raw, activation)
        reader = SafetensorsReader(path, cfg.arch)
        gen = _generation_defaults(path)
        tokenizer = from_hf_folder(path, gen.eos_token_ids)
    tensors = reader.tensor_names()
    model = build_model(cfg, reader, dtype, torch.device(device))
    for weight in _large_weights(model):
        native.use_huge_pages(weight)
    return LoadedModel(model, tokenizer, cfg, gen, str(path), model_fingerprint(cfg, tensors), tensors)


def _large_weights(model: Transformer) -> list[torch.Tensor]:
    """The matrices read every token: what the native kernels stream (they want 2 MiB pages)."""
    out = [model.embed, model.lm_head]
    for block in model.layers:
        out += [block.attn.wqkv, block.attn.wo]
        ffns = block.ffn.experts if isinstance(block.ffn, MoEFFN) else [block.ffn]
        out += [t for ffn in ffns for t in (ffn.gate_up, ffn.down_t)]
    return out


def _generation_defaults(folder: Path) -> GenerationDefaults:
    path = folder / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    raw: dict[str, Any] = json.loads(path.read_text())
    eos = raw.get("eos_token_id")
    return GenerationDefaults(
        temperature=raw.get("temperature") if raw.get("do_sample") else None,
        top_p=raw.get("top_p") if raw.get("do_sample") else None,
        top_k=raw.get("top_k") if raw.get("do_sample") else None,
        repetition_penalty=raw.get("repetition_penalty"),
        eos_token_ids=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
    )


def build_model(cfg: ModelConfig, reader: SafetensorsReader | GGUFReader, dtype: torch.dtype,
                device: torch.device) -> Transformer:
    """Convert tensor by tensor into hotcold's layout (fused qkv and gate/up, down transposed)."""

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

    def ffn(prefix: str) -> DenseFFN:
        bias = cfg.mlp_bias
        down = get(f"{prefix}.down.weight")
        return DenseFFN(cfg.activation, get(f"{prefix}.up.weight"), down.t().contiguous(),
                        gate=get(f"{prefix}.gate.weight") if cfg.gated else None,
                        up_bias=get(f"{prefix}.up.bias", bias),
                        gate_bias=get(f"{prefix}.gate.bias", bias and cfg.gated),
                        down_bias=get(f"{prefix}.down.bias", bias), gelu_approximate=cfg.gelu_approximate)

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        wqkv = torch.cat([get(f"{p}.q.weight"), get(f"{p}.k.weight"), get(f"{p}.v.weight")])
        bqkv = torch.cat([get(f"{p}.{n}.bias") for n in "qkv"]) if cfg.qkv_bias else None
        attn = Attention(cfg, wqkv, bqkv, get(f"{p}.o.weight"), get(f"{p}.o.bias") if cfg.o_bias else None)
        if cfg.num_experts:
            experts = [ffn(f"{p}.experts.{e}") for e in range(cfg.num_experts)]
            mlp = MoEFFN(get(f"{p}.router.weight"), experts, cfg.num_experts_per_tok)
        else:
            mlp = ffn(p)
        layers.append(Block(norm(f"{p}.attn_norm"), attn, norm(f"{p}.ffn_norm"), mlp, cfg.pre_norm))
    embed = get("embed.weight")
    lm_head = None if cfg.tie_word_embeddings else get("lm_head.weight", required=False)
    if lm_head is None:
        cfg.tie_word_embeddings = True  # GGUF models without output.weight share the embedding
        lm_head = embed
    pos = get("pos_embed.weight") if cfg.positional == "learned" else None
    return Transformer(cfg, embed, layers, norm("final_norm"), lm_head, pos).eval()
