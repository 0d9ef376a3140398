"""One dataclass for a model's shape and activation, read from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from hotcold.engine.errors import HotcoldError

ACTIVATIONS = ("swiglu", "reglu", "drelu", "geglu", "fatrelu", "relu", "relu2", "gelu")
GATED = {"swiglu", "reglu", "drelu", "geglu", "fatrelu"}
ARCHS = ("llama", "mistral", "qwen2", "opt", "mixtral", "sparsellama", "bamboo", "minicpm", "turbosparsemixtral")

# Published activation-sparse families, by model_type (MiniCPM's config has none: by architecture). Their
# FFN non-linearity is fixed by the architecture, whatever hidden_act says (Bamboo's says "relu" for dReLU).
# model_type -> (activation, sliding window read, mixture of experts)
_SPARSE_FAMILIES = {
    "sparsellama": ("fatrelu", False, False),  # ProSparse-Llama-2: FATReLU(gate) * up
    "minicpm": ("fatrelu", False, False),  # MiniCPM-S: FATReLU, plus MiniCPM's scalings
    "bamboo": ("drelu", True, False),  # Bamboo / TurboSparse-Mistral: relu(gate) * relu(up)
    "turbosparsemixtral": ("drelu", True, True),  # dReLU experts
}
_ARCHITECTURE_TYPES = {"MiniCPMForCausalLM": "minicpm"}

# hidden_act -> (activation of a gated FFN, activation of a non-gated FFN)
_HF_ACT = {
    "silu": ("swiglu", None),
    "swish": ("swiglu", None),
    "relu": ("reglu", "relu"),
    "relu2": (None, "relu2"),
    "gelu": ("geglu", "gelu"),
    "gelu_new": ("geglu", "gelu"),
    "gelu_pytorch_tanh": ("geglu", "gelu"),
}


@dataclass
class ModelConfig:
    """Everything the engine needs to build a model; `activation` names the whole FFN non-linearity."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # 0: hidden_size / num_heads (validate derives it)
    activation: str = "swiglu"
    gelu_approximate: str = "none"  # "tanh" for gelu_new / gelu_pytorch_tanh
    activation_threshold: float = 0.0  # FATReLU's t (hidden_act_param): keep the gate where gate >= t
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    positional: str = "rope"  # "rope" | "learned" (OPT, with an offset of 2)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    num_experts: int = 0  # 0 = dense FFN
    num_experts_per_tok: int = 2
    pre_norm: bool = True
    embed_scale: float = 1.0  # MiniCPM: embeddings x scale_emb
    residual_scale: float = 1.0  # MiniCPM: each residual branch x scale_depth / sqrt(num_layers)
    logit_divisor: float = 1.0  # MiniCPM: logits of hidden / (hidden_size / dim_model_base)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    def to_dict(self) -> dict[str, Any]:
        """The fields; those added for the sparse families are left out at their defaults, so the fingerprint
        (loader.model_fingerprint) of every other model stays what it was and its plans stay valid."""
        out = dataclasses.asdict(self)
        for key in _OMITTED_AT_DEFAULT:
            if out[key] == ModelConfig.__dataclass_fields__[key].default:
                del out[key]
        return out

    def validate(self, names: dict[str, str] | None = None) -> ModelConfig:
        """Refuse values that make no model (each would otherwise fail mid-run as a division by zero or a bad
        reshape, or run garbage: no layers, a NaN epsilon), naming the field as its source spells it (`names`:
        field -> config.json or GGUF key); derive head_dim where the source gives none."""
        def refuse(key: str, why: str) -> None:
            raise HotcoldError(f"{(names or {}).get(key, key)} {why}, got {getattr(self, key)!r}")

        if self.activation not in ACTIVATIONS:
            raise HotcoldError(f"unknown activation {self.activation!r} (choose from {', '.join(ACTIVATIONS)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings"):
            if getattr(self, key) < 1:
                refuse(key, "must be at least 1")
        if self.num_heads % self.num_kv_heads:
            refuse("num_heads", f"must be a multiple of {(names or {}).get('num_kv_heads', 'num_kv_heads')} "
                                f"({self.num_kv_heads})")
        if not self.head_dim:  # as transformers derives it, which requires a whole number
            if self.hidden_size % self.num_heads:
                refuse("hidden_size", f"must be a multiple of the {self.num_heads} heads (no head_dim given)")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim < 1 or (self.positional == "rope" and self.head_dim % 2):
            refuse("head_dim", "must be a positive even number (RoPE rotates pairs of the head's dimensions)")
        for key in ("norm_eps", "rope_theta"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                refuse(key, "must be a finite number above 0")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            refuse("num_experts_per_tok", f"must be between 1 and the {self.num_experts} experts")
        if self.sliding_window is not None and self.sliding_window < 1:
            refuse("sliding_window", "must be at least 1")
        return self


_OMITTED_AT_DEFAULT = ("activation_threshold", "embed_scale", "residual_scale", "logit_divisor")
# ModelConfig field -> config.json key, for validate's messages
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "num_experts": "num_local_experts"}
# ModelConfig field -> GGUF key after "{arch}."
_GGUF_NAMES = {"vocab_size": "vocab_size", "hidden_size": "embedding_length",
               "intermediate_size": "feed_forward_length", "num_layers": "block_count",
               "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv",
               "head_dim": "rope.dimension_count", "norm_eps": "attention.layer_norm_rms_epsilon",
               "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length"}
_REQUIRED = object()


def _num(cfg: dict, key: str, kind: type = int, default: Any = _REQUIRED) -> Any:
    """cfg[key] as an int or a float (`default` where absent or null), or a one-line error naming the key:
    int("abc") names neither it nor its file."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise HotcoldError(f"missing {key}")
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise TypeError
        out = kind(value)
        if kind is int and isinstance(value, numbers.Real) and out != value:  # 64.5 heads
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        raise HotcoldError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _need(cfg: dict, key: str) -> Any:
    if cfg.get(key) is None:
        raise HotcoldError(f"missing {key}")
    return cfg[key]


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _resolve_activation(hidden_act: str, gated: bool, override: str | None) -> str:
    if override:
        return override
    pair = _HF_ACT.get(hidden_act)
    act = pair and pair[0 if gated else 1]
    if not act:
        raise HotcoldError(f"unsupported activation {hidden_act!r} for a {'gated' if gated else 'plain'} FFN")
    return act


def _family_activation(cfg: dict, model_type: str, family_act: str | None) -> str | None:
    """A sparse family's own non-linearity; a hidden_act its published code would not run that way is refused."""
    if family_act is None:
        return None
    hidden_act = cfg.get("hidden_act", "relu")
    allowed = ("fatrelu", "relu") if family_act == "fatrelu" else ("relu",)
    if hidden_act not in allowed:
        raise HotcoldError(f"{model_type} with hidden_act {hidden_act!r} is not supported (expected "
                           f"{' or '.join(allowed)}: the architecture runs {family_act})")
    return family_act


def _threshold(cfg: dict, activation: str) -> float:
    """FATReLU's t from hidden_act_param (0 when absent or hidden_act is plain relu: FATReLU is then ReLU)."""
    if activation != "fatrelu" or cfg.get("hidden_act") == "relu":
        return 0.0
    value = cfg.get("hidden_act_param", 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise HotcoldError(f"hidden_act_param must be a finite number (FATReLU's threshold); got {value!r}")
    return float(value)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        if not isinstance(value, dict):
            raise HotcoldError(f"{key} must be an object, got {value!r}")
    theta = _num(params if "rope_theta" in params else cfg, "rope_theta", float, 10000.0)
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return theta, None
    merged = {**params, **(scaling or {})}
    merged["rope_type"] = rope_type
    if rope_type not in ("llama3", "linear"):
        raise HotcoldError(f"unsupported rope scaling {rope_type!r} (supported: llama3, linear)")
    return theta, merged


def from_hf_config(cfg: dict, activation: str | None = None) -> ModelConfig:
    """Map a transformers config.json onto ModelConfig; unknown architectures are refused clearly."""
    config = _from_hf_config(cfg, activation)
    act_name = cfg.get("activation_function") or cfg.get("hidden_act") or ""
    config.gelu_approximate = "tanh" if act_name in ("gelu_new", "gelu_pytorch_tanh") else "none"
    return config


def _model_type(cfg: dict) -> str:
    """The family, by model_type (or by architecture where the config has none); anything else is refused in
    one line naming it, custom code (auto_map) included: hotcold never runs a checkpoint's code."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type") or next((_ARCHITECTURE_TYPES[a] for a in archs if a in _ARCHITECTURE_TYPES),
                                               None)
    if model_type in ARCHS:
        return model_type
    name = ", ".join(map(str, archs)) or "none given"
    custom = " (custom code in auto_map)" if cfg.get("auto_map") else ""
    raise HotcoldError(f"unsupported architecture {name} (model_type {model_type!r}){custom}; supported: "
                       f"{', '.join(ARCHS)}")


def _from_hf_config(cfg: dict, activation: str | None) -> ModelConfig:
    model_type = _model_type(cfg)
    if model_type == "opt":
        hidden = _num(cfg, "hidden_size")
        if _num(cfg, "word_embed_proj_dim", int, hidden) != hidden:
            raise HotcoldError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
        heads = _num(cfg, "num_attention_heads")
        bias = bool(cfg.get("enable_bias", True))
        return ModelConfig(
            arch="opt", vocab_size=_num(cfg, "vocab_size"), hidden_size=hidden,
            intermediate_size=_num(cfg, "ffn_dim"), num_layers=_num(cfg, "num_hidden_layers"),
            num_heads=heads, num_kv_heads=heads, head_dim=0,
            activation=_resolve_activation(_need(cfg, "activation_function"), False, activation),
            norm="layer", norm_eps=1e-5, max_position_embeddings=_num(cfg, "max_position_embeddings", int, 2048),
            positional="learned", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bias, o_bias=bias, mlp_bias=bias, pre_norm=bool(cfg.get("do_layer_norm_before", True)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_list(cfg.get("eos_token_id")),
        ).validate(dict(_HF_NAMES, intermediate_size="ffn_dim"))

    hidden = _num(cfg, "hidden_size")
    heads = _num(cfg, "num_attention_heads")
    layers = _num(cfg, "num_hidden_layers")
    theta, scaling = _rope(cfg)
    family_act, family_window, family_moe = _SPARSE_FAMILIES.get(model_type, (None, False, False))
    windowed = model_type in ("mistral", "mixtral") or family_window or (
        model_type == "qwen2" and cfg.get("use_sliding_window"))
    window = _num(cfg, "sliding_window", int, 0) if windowed else 0
    act = activation or _family_activation(cfg, model_type, family_act) or _resolve_activation(
        cfg.get("hidden_act", "silu"), True, None)
    moe = model_type == "mixtral" or family_moe
    minicpm = model_type == "minicpm"
    return ModelConfig(
        arch=model_type, vocab_size=_num(cfg, "vocab_size"), hidden_size=hidden,
        intermediate_size=_num(cfg, "intermediate_size"),
        num_layers=layers, num_heads=heads,
        num_kv_heads=_num(cfg, "num_key_value_heads", int, heads),
        head_dim=_num(cfg, "head_dim", int, 0),
        activation=act, activation_threshold=_threshold(cfg, act),
        norm="rms", norm_eps=_num(cfg, "rms_norm_eps", float, 1e-6),
        max_position_embeddings=_num(cfg, "max_position_embeddings", int, 2048),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", minicpm)),  # MiniCPMConfig's default: tied
        embed_scale=_num(cfg, "scale_emb", float, 1.0) if minicpm else 1.0,
        # (num_hidden_layers < 1 is refused by validate)
        residual_scale=_num(cfg, "scale_depth", float, 1.0) / math.sqrt(max(layers, 1)) if minicpm else 1.0,
        logit_divisor=hidden / _num(cfg, "dim_model_base", float, hidden) if minicpm else 1.0,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=window or None,
        num_experts=_num(cfg, "num_local_experts", int, 0) if moe else 0,
        num_experts_per_tok=_num(cfg, "num_experts_per_tok", int, 2),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_list(cfg.get("eos_token_id")),
    ).validate(_HF_NAMES)


def from_gguf_metadata(meta: dict[str, Any], activation: str | None = None, powerinfer: bool = False) -> ModelConfig:
    """GGUF metadata (`{arch}.block_count`, ...) -> ModelConfig, for the llama and qwen2 GGUF families and
    PowerInfer's bamboo (llama-shaped, dReLU). The activation follows the architecture, as PowerInfer's
    sparse FFN does: ReLU on the gate (ReGLU) for a PowerInfer llama file (ReluLLaMA), relu(gate) * relu(up)
    for bamboo; SwiGLU for other llama files."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "bamboo"):
        raise HotcoldError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2, bamboo)")

    def get(key: str, kind: type = int, default: Any = _REQUIRED) -> Any:
        return _num(meta, f"{arch}.{key}", kind, default)

    if get("expert_count", int, 0):
        raise HotcoldError("GGUF mixture-of-experts models are not supported; use the safetensors checkpoint")
    heads = get("attention.head_count")
    default_act = "drelu" if arch == "bamboo" else "reglu" if powerinfer else "swiglu"
    return ModelConfig(
        arch="llama" if arch == "bamboo" else arch, vocab_size=get("vocab_size", int, 0) or _vocab_size(meta),
        hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"), num_heads=heads, num_kv_heads=get("attention.head_count_kv", int, heads),
        head_dim=get("rope.dimension_count", int, 0), activation=activation or default_act, norm="rms",
        norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-6),
        max_position_embeddings=get("context_length", int, 2048),
        rope_theta=get("rope.freq_base", float, 10000.0),
        qkv_bias=arch == "qwen2",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_list(meta.get("tokenizer.ggml.eos_token_id")),
    ).validate({field: f"{arch}.{key}" for field, key in _GGUF_NAMES.items()})


def _vocab_size(meta: dict[str, Any]) -> int:
    """A GGUF's vocabulary size where its metadata gives none: its token list's (checked by gguf_tokenizer)."""
    from hotcold.engine.gguf_tokenizer import vocabulary

    return len(vocabulary(meta))
