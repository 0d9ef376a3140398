"""Tiny GGUF files written from a tiny HF checkpoint the way llama.cpp's and PowerInfer's converters write
them: the loaders' and the GGUF tokenizer's independent input."""

from __future__ import annotations

import json
from pathlib import Path


def write_llama_gguf(folder: Path, path: Path, qtype: str = "F32", predictors: dict | None = None,
                     sparse_threshold: float | None = None) -> Path:
    """A llama GGUF of a tiny HF checkpoint, written as llama.cpp's converter does (q/k rows permuted for its
    RoPE layout, optional MLP biases), matrices in `qtype` (F32, F16 or a gguf.quants type), with the
    checkpoint's own vocabulary as tokenizer keys. With `predictors` ({layer: (fc1 [r, H], fc2 [I, r])}) it is
    PowerInfer's variant instead, as convert-hf-to-powerinfer-gguf.py writes it: magic PWRI, down stored
    transposed as `ffn_down_t`, predictors as f16 `blk.N.fc1` / `fc2`, `powerinfer.sparse_threshold`."""
    import struct

    import gguf
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder, path = Path(folder), Path(path)
    cfg = AutoConfig.from_pretrained(folder)
    sd = {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    tok = json.loads((folder / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(sorted(tok["vocab"], key=tok["vocab"].get))
    writer.add_token_types([1] * len(tok["vocab"]))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["merges"]])
    if sparse_threshold is not None:
        writer.add_float32("powerinfer.sparse_threshold", sparse_threshold)

    def add(name: str, w: np.ndarray) -> None:
        if w.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == "F16":
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float16))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w), kind), raw_dtype=kind)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        for hf, ours in names.items():
            for kind in ("weight", "bias"):
                if p + f"{hf}.{kind}" not in sd:
                    continue
                w = sd[p + f"{hf}.{kind}"]
                if predictors is not None and ours == "ffn_down" and kind == "weight":
                    add(f"blk.{i}.ffn_down_t.weight", np.ascontiguousarray(w.T))
                else:
                    add(f"blk.{i}.{ours}.{kind}", w)
        if predictors is not None:
            fc1, fc2 = predictors[i]
            writer.add_tensor(f"blk.{i}.fc1.weight", fc1.numpy().astype(np.float16))
            writer.add_tensor(f"blk.{i}.fc2.weight", fc2.numpy().astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if predictors is not None:
        with open(path, "r+b") as f:
            f.write(struct.pack("<I", int.from_bytes(b"PWRI", "little")))
    return path
