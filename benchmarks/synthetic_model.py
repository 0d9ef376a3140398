"""A synthetic ReLU-family (ReGLU) Llama checkpoint whose FFN activation statistics follow the published ones.

How the statistics are made: after RMSNorm the FFN input x has unit mean square, so for a gate row g_i drawn
N(0, 1/hidden) the pre-activation g_i·x is close to N(0, ||g_i||²). A gate bias b_i = Φ⁻¹(f_i)·||g_i|| then
makes neuron i fire (ReLU(g_i·x + b_i) > 0) on a fraction ≈ f_i of tokens. The f_i follow a power law over
a random permutation of each layer's neurons, f(rank) = f_max·(rank+1)^(-alpha), with alpha solved so the
mean is `active` (default 0.10: ~90% of neurons inactive per token, as ProSparse/TurboSparse report), so a
few neurons are hot and most are cold. The gate rows are low-rank plus noise (g_i = a_i B + n_i, B a random
orthonormal basis of `gate_rank` directions carrying 99% of each row's energy): as in trained LLMs, whose
activations DejaVu-style low-rank predictors learn, which neurons fire is a function of a few directions of
x; with fully random gate rows no rank-r predictor could see it. Other weights are N(0, 1/fan_in). The
checkpoint is a normal Hugging Face folder (config.json with mlp_bias, safetensors, a byte-level BPE
tokenizer.json).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from scipy.optimize import brentq
from scipy.stats import norm


@dataclass
class SyntheticShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "llama2-7b": SyntheticShape(4096, 11008, 32, 32, 32, 32000),
    "cpu-small": SyntheticShape(1024, 4096, 8, 8, 8, 4096),  # FFN-dominated, decodes on a 2-core CPU
    "tiny": SyntheticShape(128, 512, 4, 4, 2, 512),
}


def power_law_frequencies(n: int, mean: float, f_max: float = 0.9) -> torch.Tensor:
    """f(rank) = f_max (rank+1)^-alpha with alpha chosen so that the mean frequency is `mean`."""
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    alpha = brentq(lambda a: float((f_max * ranks ** (-a)).mean()) - mean, 1e-4, 10.0)
    return (f_max * ranks ** (-alpha)).clamp(1e-4, f_max)


def _tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    import pydoc

    texts = [pydoc.getdoc(m) for m in (json, torch, Path, dataclass, pydoc)] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:  # a small corpus gives fewer merges than a 32k vocabulary: pad with unused tokens
        tok.add_tokens([f"<unused_{i}>" for i in range(missing)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def sparse_gate(freqs: torch.Tensor, hidden: int, gate_rank: int, low_rank_energy: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's gate rows [I, H] (low rank plus noise) and biases [I]: neuron i fires on about freqs[perm[i]]
    of unit-mean-square inputs (see the module docstring)."""
    I = freqs.numel()
    basis = torch.linalg.qr(torch.randn(hidden, gate_rank, generator=gen))[0].T  # [r, H] orthonormal rows
    gate = (low_rank_energy**0.5 * torch.randn(I, gate_rank, generator=gen) @ basis / gate_rank**0.5
            + (1 - low_rank_energy) ** 0.5 * torch.randn(I, hidden, generator=gen) / hidden**0.5)
    f = freqs[torch.randperm(I, generator=gen)]
    return gate, torch.from_numpy(norm.ppf(f.numpy())).float() * gate.norm(dim=1)


@torch.no_grad()
def make_synthetic_checkpoint(folder: Path, shape: SyntheticShape, active: float = 0.10, seed: int = 0,
                              dtype: torch.dtype = torch.bfloat16, gate_rank: int = 0,
                              low_rank_energy: float = 0.99) -> Path:
    """Write the checkpoint into `folder` (kept when one of the same recipe is there); returns the folder.
    A folder written by another recipe is replaced, plans profiled on it included."""
    folder = Path(folder)
    H, I, hd = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    gate_rank = gate_rank or max(8, H // 16)
    recipe = {"active_fraction": active, "seed": seed, "distribution": "power law", "gate_rank": gate_rank,
              "low_rank_energy": low_rank_energy, "dtype": str(dtype)}
    if (folder / "config.json").exists():
        if json.loads((folder / "config.json").read_text()).get("synthetic") == recipe:
            return folder
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) / fan_in**0.5).to(dtype)

    freqs = power_law_frequencies(I, active)
    tensors = {"model.embed_tokens.weight": randn(shape.vocab, H, fan_in=1),
               "model.norm.weight": torch.ones(H, dtype=dtype), "lm_head.weight": randn(shape.vocab, H, fan_in=H)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        gate, bias = sparse_gate(freqs, H, gate_rank, low_rank_energy, gen)
        tensors.update({
            p + "input_layernorm.weight": torch.ones(H, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=dtype),
            p + "self_attn.q_proj.weight": randn(H, H, fan_in=H),
            p + "self_attn.k_proj.weight": randn(shape.kv_heads * hd, H, fan_in=H),
            p + "self_attn.v_proj.weight": randn(shape.kv_heads * hd, H, fan_in=H),
            p + "self_attn.o_proj.weight": randn(H, H, fan_in=H),
            p + "mlp.gate_proj.weight": gate.to(dtype), p + "mlp.gate_proj.bias": bias.to(dtype),
            p + "mlp.up_proj.weight": randn(I, H, fan_in=H), p + "mlp.up_proj.bias": torch.zeros(I, dtype=dtype),
            p + "mlp.down_proj.weight": randn(H, I, fan_in=I * active),
            p + "mlp.down_proj.bias": torch.zeros(H, dtype=dtype),
        })
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
              "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "hidden_act": "relu",
              "mlp_bias": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              "synthetic": recipe}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    _tokenizer(folder, shape.vocab)
    return folder
