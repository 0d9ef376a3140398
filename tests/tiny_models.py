"""Tiny random checkpoints written by transformers: the independent reference for the engine's loaders.

Every kind is built by transformers itself (``save_pretrained``, safetensors), so the engine must read the
exact on-disk layout real checkpoints use. Weights are re-drawn with a fixed seed at a scale that gives
logits of order 1 (transformers' default init, std 0.02, makes near-uniform logits and fragile argmaxes);
biases and norm weights are made non-trivial so that forgetting one shows up in the logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
GENERATION_EOS_IDS = [EOS_ID, PAD_ID]  # generation_config.json lists two stop ids, as Qwen2/Llama-3 do
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SEED = 1234

_CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "A quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Large language models predict the next token from the tokens that came before.",
    "Sparse activations let hot neurons live on the GPU while cold neurons stay on the CPU.",
    "Hello world! This is a tiny tokenizer trained on a few sentences for tests.",
    "Numbers like 12345 and 67890 appear in text, as do symbols such as #, $, % and &.",
    "The weather today is sunny with a chance of rain in the evening.",
    "def main():\n    print('hello')\n    return 0\n",
    "Once upon a time there was a model that was very small and very random.",
    "Attention heads share keys and values in grouped query attention.",
] * 4

_LLAMA_BASE: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=256, hidden_act="silu", rms_norm_eps=1e-5,
)

# kind -> (model_type, config kwargs, save kwargs)
KINDS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama": ("llama", dict(_LLAMA_BASE, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}), {}),
    "llama_untied_bias": ("llama", dict(_LLAMA_BASE, intermediate_size=144, tie_word_embeddings=False,
                                        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6), {}),
    "llama3_rope": ("llama", dict(_LLAMA_BASE, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), {}),
    "llama_sharded": ("llama", dict(_LLAMA_BASE, num_hidden_layers=4, intermediate_size=160,
                                    tie_word_embeddings=False), {"max_shard_size": "300KB"}),
    "relu_llama": ("llama", dict(_LLAMA_BASE, intermediate_size=136, hidden_act="relu",
                                 tie_word_embeddings=False), {}),
    "mistral": ("mistral", dict(_LLAMA_BASE, sliding_window=16, tie_word_embeddings=False), {}),
    "qwen2": ("qwen2", dict(_LLAMA_BASE, intermediate_size=160, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {}),
    "opt": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=160,
                        max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                        activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                        dropout=0.0, tie_word_embeddings=True), {}),
    "opt_gelu": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=144,
                             max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                             activation_function="gelu", dropout=0.0), {}),
    "opt_relu2": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=136,
                              max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                              activation_function="relu2", dropout=0.0), {}),
    "mixtral": ("mixtral", dict(_LLAMA_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                tie_word_embeddings=False), {}),
}


def build_tokenizer():
    """A byte-level BPE with exactly VOCAB_SIZE entries (256 bytes + 3 specials + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} entries, wanted {VOCAB_SIZE}")
    return tok


def _save_tokenizer(out_dir: Path) -> None:
    tok = build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID], "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 256, "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@torch.no_grad()
def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights ~ N(0, 1/fan_in); norm weights 1 + N(0, 0.1^2); biases N(0, 0.1^2)."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def make_config(kind: str, **overrides: Any):
    """The transformers config object for ``kind`` (overrides win over the kind's defaults)."""
    from transformers import AutoConfig

    if kind not in KINDS:
        raise KeyError(f"unknown tiny model kind {kind!r}; known: {sorted(KINDS)}")
    model_type, kwargs, _ = KINDS[kind]
    kwargs = dict(kwargs, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID, dtype="float32")
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_checkpoint(kind: str, out_dir: Path, **overrides: Any) -> Path:
    """Build, randomize and save a tiny ``kind`` model with its tokenizer; returns ``out_dir``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = make_config(kind, **overrides)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, torch.Generator().manual_seed(SEED))
    model.save_pretrained(out_dir, safe_serialization=True, **KINDS[kind][2])
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=GENERATION_EOS_IDS, pad_token_id=PAD_ID,
                     do_sample=True, temperature=0.7, top_p=0.9).save_pretrained(out_dir)
    _save_tokenizer(out_dir)
    return out_dir


def reference_model(path: Path, attn_implementation: str = "eager"):
    """The checkpoint loaded back by transformers: float32, eval mode, plain eager attention and experts
    (the numerical reference; sdpa and grouped_mm agree with it to ~3e-6 on these models)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn_implementation,
        experts_implementation="eager")
    return model.eval()


def reference_tokenizer(path: Path):
    """The checkpoint's tokenizer as transformers reads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def make_bin_checkpoint(src: Path, out_dir: Path, num_shards: int = 1) -> Path:
    """A copy of the safetensors checkpoint ``src`` as ``pytorch_model.bin`` (one shard) or as
    ``pytorch_model-0000i-of-0000N.bin`` shards with ``pytorch_model.bin.index.json``, as transformers 4 and
    ReluLLaMA publish them (torch.save of the state dict, zip format); no safetensors left in ``out_dir``."""
    import shutil

    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(f, out_dir / f.name)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if num_shards == 1:
        torch.save(state, out_dir / "pytorch_model.bin")
        return out_dir
    keys = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = keys[i::num_shards]
        torch.save({k: state[k] for k in part}, out_dir / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


# ---- The published activation-sparse checkpoints (issue 12), tiny: config.json written with the keys the real
# ones carry (architectures, model_type, hidden_act, hidden_act_param, auto_map, MiniCPM's scalings), tensors
# under their real names, random weights. Built by transformers' Llama / Mistral / Mixtral, whose tensor layout
# they share; `published_reference` loads them back into those classes with the real activation swapped in.

def _auto_map(module: str, name: str) -> dict[str, str]:
    return {"AutoConfig": f"configuration_{module}.{name}Config",
            "AutoModel": f"modeling_{module}.{name}Model",
            "AutoModelForCausalLM": f"modeling_{module}.{name}ForCausalLM"}


_PUBLISHED_SHAPE: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.02,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, torch_dtype="bfloat16", use_cache=True, rope_scaling=None,
)

# kind -> (transformers class family, config.json as published: tiny sizes, the real keys and values)
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "prosparse_llama": ("llama", dict(  # ProSparse-Llama-2-7B
        _PUBLISHED_SHAPE, architectures=["SparseLlamaForCausalLM"], model_type="sparsellama",
        auto_map=_auto_map("sparsellama", "SparseLlama"), hidden_act="fatrelu", hidden_act_param=0.01,
        pretraining_tp=1, tie_word_embeddings=False, transformers_version="4.31.0")),
    "minicpm_s": ("llama", dict(  # MiniCPM-S-1B: no model_type, tied embeddings by MiniCPMConfig's default
        _PUBLISHED_SHAPE, architectures=["MiniCPMForCausalLM"], auto_map=_auto_map("minicpm", "MiniCPM"),
        hidden_act="fatrelu", hidden_act_param=0.03, scale_emb=12, dim_model_base=16, scale_depth=1.4,
        initializer_range=0.1, transformers_version="4.36.0")),
    "bamboo": ("mistral", dict(  # Bamboo-7B / TurboSparse-Mistral: dReLU though hidden_act says relu
        _PUBLISHED_SHAPE, architectures=["BambooForCausalLM"], model_type="bamboo",
        auto_map=_auto_map("bamboo", "Bamboo"), hidden_act="relu", sliding_window=16, rope_theta=10000.0,
        attention_dropout=0.0, tie_word_embeddings=False)),
    "turbosparse_mixtral": ("mixtral", dict(  # TurboSparse-Mixtral-47B: dReLU experts
        _PUBLISHED_SHAPE, architectures=["TurboSparseMixtralForCausalLM"], model_type="turbosparsemixtral",
        auto_map=_auto_map("turbosparsemixtral", "TurboSparseMixtral"), hidden_act="relu", num_local_experts=4,
        num_experts_per_tok=2, sliding_window=None, rope_theta=1000000.0, router_aux_loss_coef=0.02,
        tie_word_embeddings=False)),
}
PREDICTOR_RANK = 8  # TurboSparse ships predictors in the checkpoint: mlp.predictor.fc1 / fc2 (ignored here)


def _base_config(family: str, published: dict[str, Any]):
    """The transformers config of the class whose layout the published checkpoint shares."""
    from transformers import AutoConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id")
    kwargs = {k: published[k] for k in keys}
    kwargs.update(hidden_act="relu", pad_token_id=PAD_ID, dtype="float32",
                  tie_word_embeddings=published.get("tie_word_embeddings", True),
                  rope_parameters={"rope_type": "default", "rope_theta": float(published.get("rope_theta", 1e4))})
    if family in ("mistral", "mixtral"):
        kwargs["sliding_window"] = published.get("sliding_window")
    if family == "mixtral":
        kwargs.update(num_local_experts=published["num_local_experts"],
                      num_experts_per_tok=published["num_experts_per_tok"])
    return AutoConfig.for_model(family, **kwargs)


def make_published_checkpoint(kind: str, out_dir: Path) -> Path:
    """A tiny `kind` of PUBLISHED. FATReLU models get gate rows scaled so that gate pre-activations have a spread
    of ~1.5 t (a quarter of them land in [0, t): the threshold matters) and up rows scaled back by as much."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    family, published = PUBLISHED[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(_base_config(family, published), dtype=torch.float32).eval()
    _randomize(model, torch.Generator().manual_seed(SEED))
    if published["hidden_act"] == "fatrelu":
        spread = 1.5 * published["hidden_act_param"]
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate_proj.weight.mul_(spread)
                layer.mlp.up_proj.weight.div_(spread)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "config.json").write_text(json.dumps(published, indent=2))
    if kind in ("bamboo", "turbosparse_mixtral"):
        path = out_dir / "model.safetensors"
        state = load_file(str(path))
        gen = torch.Generator().manual_seed(SEED + 1)
        H, I = published["hidden_size"], published["intermediate_size"]
        mlps = [f"model.layers.{i}.mlp" for i in range(published["num_hidden_layers"])]
        if kind == "turbosparse_mixtral":
            mlps = [f"model.layers.{i}.block_sparse_moe.experts.{e}" for i in range(published["num_hidden_layers"])
                    for e in range(published["num_local_experts"])]
        for mlp in mlps:
            state[f"{mlp}.predictor.fc1.weight"] = torch.randn(PREDICTOR_RANK, H, generator=gen)
            state[f"{mlp}.predictor.fc2.weight"] = torch.randn(I, PREDICTOR_RANK, generator=gen)
        save_file(state, str(path), metadata={"format": "pt"})
    _save_tokenizer(out_dir)
    return out_dir


class FATReLU(torch.nn.Module):
    """ProSparse's activation: the gate where gate >= t, else 0."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return torch.where(g >= self.threshold, g, torch.zeros_like(g))


def _drelu_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(torch.relu(mlp.gate_proj(x)) * torch.relu(mlp.up_proj(x)))


def _drelu_experts_forward(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' MixtralExperts.forward (eager) with relu(gate) * relu(up) in place of silu(gate) * up."""
    out = torch.zeros_like(hidden)
    for e in range(experts.num_experts):
        pos, tokens = torch.where((top_k_index == e).T)
        if tokens.numel():
            gate, up = torch.nn.functional.linear(hidden[tokens], experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.relu(gate) * torch.relu(up), experts.down_proj[e])
            out.index_add_(0, tokens, y * top_k_weights[tokens, pos, None])
    return out


def published_reference(kind: str, path: Path, activation: str | None = None):
    """The checkpoint in transformers' Llama / Mistral / Mixtral (float32, eager) with the published activation
    swapped into its MLPs: "fatrelu" (threshold from config.json), "drelu", or `activation` "relu" for plain
    ReLU(gate) * up. MiniCPM's scalings are not applied here (tests/test_published_archs.py has them)."""
    import types

    from transformers import AutoModelForCausalLM

    family, _ = PUBLISHED[kind]
    published = json.loads((Path(path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        str(path), config=_base_config(family, published), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").eval()
    act = activation or ("fatrelu" if published["hidden_act"] == "fatrelu" else "drelu")
    for layer in model.model.layers:
        if act == "fatrelu":
            layer.mlp.act_fn = FATReLU(float(published["hidden_act_param"]))
        elif act == "drelu" and family == "mixtral":
            layer.mlp.experts.forward = types.MethodType(_drelu_experts_forward, layer.mlp.experts)
        elif act == "drelu":
            layer.mlp.forward = types.MethodType(_drelu_mlp_forward, layer.mlp)
        elif act != "relu":
            raise ValueError(act)
    return model


def fixed_set_predictor(hidden_size: int, num_neurons: int, seed: int, share: float = 0.4) -> tuple[dict, torch.Tensor]:
    """Low-rank predictor weights (w1, b1, w2, b2) that always pick the same random neurons (their logits
    come from b2 alone: +5 kept, -5 not), and that neuron mask: an executor test then knows which rows run."""
    import torch

    keep = torch.rand(num_neurons, generator=torch.Generator().manual_seed(seed)) < share
    weights = {"w1": torch.zeros(4, hidden_size), "b1": torch.zeros(4), "w2": torch.zeros(num_neurons, 4),
               "b2": torch.where(keep, 5.0, -5.0)}
    return weights, keep


def token_dependent_predictor(hidden_size: int, num_neurons: int, seed: int, rank: int = 4,
                              bias: float = -2.0) -> dict:
    """Low-rank predictor weights (w1, b1, w2, b2) whose picks differ from token to token: a random rank-`rank`
    projection of x, ReLU, then large random read-out weights (logits of a few units either side of 0) and an
    offset `bias` that keeps a minority of neurons per token. predictor_picks_f64 says which neurons it picks."""
    gen = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(rank, hidden_size, generator=gen) / math.sqrt(hidden_size),
            "b1": 0.2 * torch.randn(rank, generator=gen),
            "w2": 4.0 * torch.randn(num_neurons, rank, generator=gen),
            "b2": bias + 0.5 * torch.randn(num_neurons, generator=gen)}


def predictor_picks_f64(weights: dict, x: torch.Tensor, tau: float = 0.5, margin: float = 1e-4) -> torch.Tensor:
    """[T, I] bool: the neurons a plan predictor picks for each token of x under the plan's threshold rule
    (sigmoid(w2 relu(w1 x + b1) + b2) >= tau), computed in float64; asserts that no logit lies within `margin`
    of the cut, so a float32 executor cannot decide a neuron the other way by rounding."""
    w = {k: v.double() for k, v in weights.items()}
    logits = torch.relu(x.detach().cpu().double() @ w["w1"].T + w["b1"]) @ w["w2"].T + w["b2"]
    cut = math.log(tau / (1 - tau))
    assert (logits - cut).abs().min().item() > margin, "a logit sits on the cut: pick another seed"
    return torch.sigmoid(logits) >= tau
