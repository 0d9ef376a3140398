"""A Llama-2-7B-shaped model of a few layers, random weights, written as a Q4_0 GGUF that both hotcold and
llama.cpp run: the realistic size (4096 hidden, 11008 intermediate, 32 heads) where a decoded token's time
is the weights' reads, not the per-layer overhead that dominates a 135M model.

    python benchmarks/synthetic_gguf.py [--layers 8] [--active 0.1] [--out PATH]      # prints the path
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


def make_synthetic_gguf(out: Path, layers: int = 8, seed: int = 0, active: float | None = None,
                        gate_rank: int = HIDDEN // 16) -> Path:
    """`active`: ReLU-family FFNs (hotcold runs them as ReGLU, `--activation reglu`) whose neurons fire on that
    mean fraction of tokens, from gate rows and biases made as benchmarks/synthetic_model.py makes them (a
    power law of frequencies; low-rank gates a predictor can learn); up and down biases are zeros. llama.cpp
    reads the biases as the llama architecture's optional MLP biases and runs SwiGLU: the same bytes."""
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

    def ffn(i: int) -> None:
        if active is None:
            matrix(f"blk.{i}.ffn_gate.weight", INTERMEDIATE, HIDDEN)
            matrix(f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN)
            matrix(f"blk.{i}.ffn_down.weight", HIDDEN, INTERMEDIATE)
            return
        gate, bias = sparse_gate(freqs, HIDDEN, gate_rank, 0.99, gen)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", quant.quantize(gate, "Q4_0").data.numpy(),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        writer.add_tensor(f"blk.{i}.ffn_gate.bias", bias.numpy().astype(np.float32))
        matrix(f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN)
        writer.add_tensor(f"blk.{i}.ffn_up.bias", np.zeros(INTERMEDIATE, dtype=np.float32))
        w = torch.randn(HIDDEN, INTERMEDIATE, generator=gen) * (1.0 / (INTERMEDIATE * active) ** 0.5)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", quant.quantize(w, "Q4_0").data.numpy(),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        writer.add_tensor(f"blk.{i}.ffn_down.bias", np.zeros(HIDDEN, dtype=np.float32))

    if active is not None:
        from synthetic_model import power_law_frequencies, sparse_gate

        freqs = power_law_frequencies(INTERMEDIATE, active)

    matrix("token_embd.weight", vocab, HIDDEN)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        ffn(i)
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
    ap.add_argument("--active", type=float, default=None,
                    help="ReLU-family FFNs whose neurons fire on this mean fraction of tokens (e.g. 0.1)")
    ap.add_argument("--gate-rank", type=int, default=HIDDEN // 16,
                    help="rank of the gates' low-rank part (which neurons fire is a function of that many directions)")
    args = ap.parse_args()
    tail = "" if args.active is None else f"-reglu{args.active:g}"
    tail += "" if args.gate_rank == HIDDEN // 16 else f"-r{args.gate_rank}"
    out = Path(args.out) if args.out else cache_dir() / "synthetic" / f"llama7b-{args.layers}l-q4_0{tail}.gguf"
    print(make_synthetic_gguf(out, args.layers, active=args.active, gate_rank=args.gate_rank))


if __name__ == "__main__":
    main()
