"""Checkpoints whose config or tensors make no model: each is refused at load in one line naming the field (and
its file) or the tensor, never a ZeroDivisionError, a bad reshape mid-run, or a run with zero layers or a NaN
epsilon; legitimate variations (head_dim given explicitly, symlinked shards) still load."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gguf import write_llama_gguf
from tiny_models import make_tiny_checkpoint

from hotcold.engine.errors import HotcoldError
from hotcold.engine.loader import load_model

PROMPT = torch.tensor(list(range(3, 20)))


def _refused(spec, *needles: str) -> str:
    """load_model refuses `spec` with a one-line HotcoldError holding every needle; returns the message."""
    with pytest.raises(HotcoldError) as excinfo:
        load_model(spec, dtype="float32")
    message = str(excinfo.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def _copy(tiny_checkpoint, tmp_path, kind: str = "llama"):
    folder = tmp_path / kind
    shutil.copytree(tiny_checkpoint(kind), folder)
    return folder


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))  # NaN is written as NaN, which json (and transformers) reads back


# ---------------------------------------------------------------- config.json values that make no model

def _set(**values):
    return lambda cfg: cfg.update(values)


def _no_head_dim(**values):
    return lambda cfg: (cfg.pop("head_dim"), cfg.update(values))


@pytest.mark.parametrize("edit,needles", [
    (_set(num_attention_heads=0), ["num_attention_heads must be at least 1, got 0"]),
    (_set(hidden_size=0), ["hidden_size must be at least 1, got 0"]),
    (_set(num_key_value_heads=0), ["num_key_value_heads must be at least 1, got 0"]),
    (_set(num_hidden_layers=0), ["num_hidden_layers must be at least 1, got 0"]),
    (_set(num_hidden_layers=-1), ["num_hidden_layers must be at least 1, got -1"]),
    (_set(intermediate_size=0), ["intermediate_size must be at least 1"]),
    (_set(num_attention_heads=3), ["num_attention_heads must be a multiple of num_key_value_heads (2), got 3"]),
    (_no_head_dim(num_attention_heads=3, num_key_value_heads=3), ["hidden_size must be a multiple of the 3 heads"]),
    (_set(head_dim=7), ["head_dim must be a positive even number"]),
    (_set(rms_norm_eps=math.nan), ["rms_norm_eps must be a finite number above 0, got nan"]),
    (_set(rms_norm_eps=0), ["rms_norm_eps must be a finite number above 0"]),
    (_set(rms_norm_eps="abc"), ["rms_norm_eps must be a number, got 'abc'"]),
    (_set(hidden_size=64.5), ["hidden_size must be an integer, got 64.5"]),
    (_set(rope_parameters="x"), ["rope_parameters must be an object, got 'x'"]),
    (_set(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), ["rope_theta must be a finite number"]),
    (_set(max_position_embeddings=0), ["max_position_embeddings must be at least 1"]),
], ids=["heads_0", "hidden_0", "kv_heads_0", "layers_0", "layers_-1", "intermediate_0", "heads_3_kv_2",
        "hidden_64_heads_3", "head_dim_7", "eps_nan", "eps_0", "eps_abc", "hidden_64.5", "rope_parameters_str",
        "theta_-1", "max_positions_0"])
def test_hf_config_that_makes_no_model_is_refused(edit, needles, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, edit)
    _refused(folder, str(folder / "config.json"), *needles)


def test_config_that_is_not_an_object_is_refused(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    _refused(folder, str(folder / "config.json"), "expected a JSON object, found list")


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_invalid_json_beside_the_model_names_its_file(name, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / name).write_text('{"eos_token_id": 2,}')
    _refused(folder, f"{folder / name}: invalid JSON")


def test_head_dim_given_explicitly_still_loads(tmp_path):
    """A head_dim given explicitly need not be hidden_size / num_heads (Mistral Nemo: 32 heads of 128 over 5120):
    q is then [heads * head_dim, hidden], not square."""
    folder = make_tiny_checkpoint("llama", tmp_path / "hd", num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=16)
    loaded = load_model(folder, dtype="float32")
    assert (loaded.config.num_heads, loaded.config.head_dim) == (2, 16)
    assert torch.isfinite(loaded.model.forward_sequence(PROMPT)).all()


# ---------------------------------------------------------------- tensors that disagree with the config

def _rewrite(folder, name: str, make) -> None:
    """Replace one tensor of the folder's model.safetensors by make(old tensor)."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[name] = make(state[name])
    save_file(state, str(path), metadata={"format": "pt"})


UP, Q, K = (f"model.layers.0.{n}.weight" for n in ("mlp.up_proj", "self_attn.q_proj", "self_attn.k_proj"))
EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"


@pytest.mark.parametrize("name,make,needle", [
    (UP, lambda t: t[:100].clone(), f"tensor {UP} has shape [100, 64], the config implies [128, 64]"),
    (UP, lambda t: t.t().contiguous(), f"tensor {UP} has shape [64, 128], the config implies [128, 64]"),
    (Q, lambda t: t[:, :32].contiguous(), f"tensor {Q} has shape [64, 32], the config implies [64, 64]"),
    (K, lambda t: torch.zeros(48, 64), f"tensor {K} has shape [48, 64], the config implies [32, 64]"),
    (EMBED, lambda t: t[:, :48].contiguous(), f"tensor {EMBED} has shape [320, 48], the config implies [320, 64]"),
    (EMBED, lambda t: t[:10].clone(), f"tensor {EMBED} has shape [10, 64], the config implies [320, 64]"),
    (NORM, lambda t: t[:63].clone(), f"tensor {NORM} has shape [63], the config implies [64]"),
    (UP, lambda t: t.to(torch.int64), f"tensor {UP} is I64: weights must be floating point"),
    (UP, lambda t: t > 0, f"tensor {UP} is BOOL: weights must be floating point"),
], ids=["up_100", "up_transposed", "q_64x32", "k_48", "embed_48", "embed_10_rows", "norm_63", "up_int64",
        "up_bool"])
def test_tensor_that_disagrees_with_the_config_is_refused(name, make, needle, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, name, make)
    _refused(folder, needle)


def test_cli_reports_a_bad_tensor_in_one_line(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, EMBED, lambda t: t[:10].clone())
    result = subprocess.run([sys.executable, "-m", "hotcold.cli", "generate", "--model", str(folder), "--prompt",
                             "Hello", "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hotcold generate: error: tensor "), result.stderr


# ---------------------------------------------------------------- shards named outside the folder

def _index(folder, weights, shard: str) -> None:
    """An index that lists every tensor of the file `weights` as being in `shard`."""
    names = load_file(str(weights))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))


def test_index_naming_a_shard_outside_the_folder_is_refused(tiny_checkpoint, tmp_path):
    """A readable, valid safetensors file outside the folder: loading it would succeed, so only the refusal
    keeps the index from reading files elsewhere."""
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    _index(folder, tmp_path / "outside.safetensors", "../outside.safetensors")
    _refused(folder, "model.safetensors.index.json", "shard '../outside.safetensors' lies outside the model folder")
    _index(folder, tmp_path / "outside.safetensors", str(tmp_path / "outside.safetensors"))
    _refused(folder, "lies outside the model folder")


def test_symlinked_shard_inside_the_folder_still_loads(tiny_checkpoint, tmp_path):
    """The Hugging Face cache's snapshot folders hold symlinks into ../../blobs: the name is what is checked."""
    folder = _copy(tiny_checkpoint, tmp_path)
    (tmp_path / "blobs").mkdir()
    (folder / "model.safetensors").rename(tmp_path / "blobs" / "abc123")
    (folder / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "blobs" / "abc123")
    _index(folder, tmp_path / "blobs" / "abc123", "model-00001-of-00001.safetensors")
    want = load_model(tiny_checkpoint("llama"), dtype="float32").model.forward_sequence(PROMPT)
    got = load_model(folder, dtype="float32").model.forward_sequence(PROMPT)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- GGUF metadata and tensors

def _rebuild_gguf(src, dst, meta: dict | None = None, drop: tuple[str, ...] = (), tensors: dict | None = None):
    """A copy of the GGUF at `src` with metadata values replaced or added (`meta`), keys dropped and tensors
    replaced by (array, raw_dtype)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    meta = meta or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, meta.get(key, field.contents()), field.types[0], sub)
    for key, value in meta.items():
        if key not in reader.fields:
            kind = gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.FLOAT32
            writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        data, raw_dtype = (tensors or {}).get(t.name, (np.array(t.data), t.tensor_type))
        writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A Q8_0 llama GGUF of the tiny llama checkpoint (hidden 64, 4 heads, 2 kv heads, 320 tokens)."""
    root = tmp_path_factory.mktemp("bad_gguf")
    return write_llama_gguf(make_tiny_checkpoint("llama", root / "hf"), root / "tiny.gguf", qtype="Q8_0")


@pytest.mark.parametrize("key,value,needle", [
    ("llama.attention.head_count", 0, "llama.attention.head_count must be at least 1, got 0"),
    ("llama.embedding_length", 0, "llama.embedding_length must be at least 1, got 0"),
    ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv must be at least 1, got 0"),
    ("llama.block_count", 0, "llama.block_count must be at least 1, got 0"),
    ("llama.rope.dimension_count", 7, "llama.rope.dimension_count must be a positive even number"),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon must be a finite number above 0"),
    ("llama.rope.freq_base", -1.0, "llama.rope.freq_base must be a finite number above 0, got -1.0"),
], ids=["heads_0", "embedding_0", "kv_heads_0", "blocks_0", "rope_dims_7", "eps_nan", "freq_base_-1"])
def test_gguf_metadata_that_makes_no_model_is_refused(key, value, needle, tiny_gguf, tmp_path):
    path = _rebuild_gguf(tiny_gguf, tmp_path / "bad.gguf", meta={key: value})
    _refused(path, f"{path}: ", needle)


def test_gguf_without_vocabulary_is_refused(tiny_gguf, tmp_path):
    path = _rebuild_gguf(tiny_gguf, tmp_path / "novocab.gguf", drop=("tokenizer.ggml.tokens",))
    _refused(path, "lacks its vocabulary (tokenizer.ggml.tokens")


def test_gguf_tensor_with_a_zero_dimension_is_a_shape_error(tiny_gguf, tmp_path):
    """A Q8_0 embedding with no columns: a shape error, not advice to convert the (Q8_0) file to Q8_0."""
    empty = np.zeros((320, 0), dtype=np.uint8)  # Q8_0 blocks of no columns
    path = _rebuild_gguf(tiny_gguf, tmp_path / "dim0.gguf",
                         tensors={"token_embd.weight": (empty, gguf.GGMLQuantizationType.Q8_0)})
    with pytest.raises(HotcoldError) as excinfo:
        load_model(path)  # the quantized blocks kept (no dtype): the path that gave the advice
    message = str(excinfo.value)
    assert message == "tensor token_embd.weight has shape [320, 0], the config implies [320, 64]", message
