"""A Llama-2-7B-shaped model of a few layers, random weights, written as a Q4_0 GGUF that both hotcold and
llama.cpp run: the realistic size (4096 hidden, 11008 intermediate, 32 heads) where a decoded token's time
is the weights' reads, not the per-layer overhead that dominates a 135M model.

    python benchmarks/synthetic_gguf.py [--layers 8] [--out PATH]      # prints the path
    python benchmarks/decode_cpu.py --model PATH --dtypes auto --no-transformers --new-tokens 32 --prefill 128

The tokenizer (and so the head: 49152 rows, not Llama-2's 32000) is the default model's, copied from its
GGUF, so that llama.cpp accepts the file. Matrices are Q4_0 (quantized by kernels.quant, which matches
gguf.quants: tests/test_quant.py), norms F32. Written once and cached.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
import torch

from hotcold.kernels import quant

HIDDEN, INTERMEDIATE, HEADS = 4096, 11008, 32


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    reader = gguf.GGUFReader(str(source))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in fields:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in fields:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("padding_token_id", writer.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in fields:
            add(fields[f"tokenizer.ggml.{key}"])
    writer.add_add_bos_token(False)
    return len(fields["tokenizer.ggml.tokens"])


def make_synthetic_gguf(out: Path, layers: int = 8, seed: int = 0) -> Path:
    if out.exists():
        return out
    from hotcold.engine.default_model import ensure_default_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = _copy_tokenizer(writer, ensure_default_model())
    gen = torch.Generator().manual_seed(seed)

    def matrix(name: str, rows: int, cols: int) -> None:
        w = torch.randn(rows, cols, generator=gen) * (1.0 / cols**0.5)
        writer.add_tensor(name, quant.quantize(w, "Q4_0").data.numpy(), raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))

    matrix("token_embd.weight", vocab, HIDDEN)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", INTERMEDIATE, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, INTERMEDIATE)
    norm("output_norm.weight")
    matrix("output.weight", vocab, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def main() -> None:
    from hotcold.engine.default_model import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out) if args.out else cache_dir() / "synthetic" / f"llama7b-{args.layers}l-q4_0.gguf"
    print(make_synthetic_gguf(out, args.layers))


if __name__ == "__main__":
    main()
