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
