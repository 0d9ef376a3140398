"""Checkpoint formats and damaged files: pytorch_model*.bin against transformers, pickles that try to run code,
and truncated or corrupt safetensors / GGUF files reported with the bytes expected and found."""

from __future__ import annotations

import json
import os
import pickle
import struct

import gguf
import numpy as np
import pytest
import torch
from tiny_models import make_bin_checkpoint

from hotcold.engine.errors import HotcoldError
from hotcold.engine.gguf_weights import GGUFReader
from hotcold.engine.loader import load_model

PROMPT = list(range(3, 27))


def _transformers_logits(path, ids: list[int]) -> torch.Tensor:
    """transformers' own loader on the folder (it reads .bin shards and their index itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("kind,shards", [("llama", 1), ("llama_sharded", 3)])
def test_bin_checkpoint_matches_transformers(kind, shards, tiny_checkpoint, tmp_path):
    folder = make_bin_checkpoint(tiny_checkpoint(kind), tmp_path / kind, num_shards=shards)
    assert not list(folder.glob("*.safetensors"))
    assert (folder / "pytorch_model.bin.index.json").exists() == (shards > 1)
    ours = load_model(folder, dtype="float32").model.forward_sequence(torch.tensor(PROMPT))
    ref = _transformers_logits(folder, PROMPT)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


class _RunsCode:
    """A pickle payload that runs a shell command when unpickled (the classic malicious checkpoint)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(zip_format, tiny_checkpoint, tmp_path):
    folder = make_bin_checkpoint(tiny_checkpoint("llama"), tmp_path / "evil")
    marker = tmp_path / "marker"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = _RunsCode(f"touch {marker}")
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)

    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    message = _one_line_error(excinfo)
    assert "refused" in message and "system" in message, message
    assert not marker.exists()

    # the payload is live: an unrestricted unpickler runs it (so the check above can fail)
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_plain_pickle_is_refused_and_never_run(tiny_checkpoint, tmp_path):
    folder = make_bin_checkpoint(tiny_checkpoint("llama"), tmp_path / "evil")
    marker = tmp_path / "marker"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(f"touch {marker}")}))
    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    assert "refused" in _one_line_error(excinfo)
    assert not marker.exists()


def test_safetensors_preferred_over_bin(tiny_checkpoint, tmp_path):
    """Both present: the safetensors weights are used and the .bin beside them is never unpickled."""
    src = tiny_checkpoint("llama")
    folder = make_bin_checkpoint(src, tmp_path / "both")
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    marker = tmp_path / "marker"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(f"touch {marker}")}))
    ours = load_model(folder, dtype="float32").model.forward_sequence(torch.tensor(PROMPT))
    ref = _transformers_logits(src, PROMPT)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert not marker.exists()


def test_folder_without_weights_names_both_formats(tiny_checkpoint, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint("llama") / "config.json").read_text())
    with pytest.raises(HotcoldError, match=r"no \*\.safetensors or pytorch_model\*\.bin"):
        load_model(folder, dtype="float32")


def test_truncated_bin_is_one_line(tiny_checkpoint, tmp_path):
    folder = make_bin_checkpoint(tiny_checkpoint("llama"), tmp_path / "cut")
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    assert "truncated or corrupt" in _one_line_error(excinfo)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors_gives_bytes_expected_and_found(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("llama"), tmp_path / "cut")
    path = folder / "model.safetensors"
    full = path.stat().st_size
    for cut in (100, full // 2):
        path.write_bytes((tiny_checkpoint("llama") / "model.safetensors").read_bytes()[: full - cut])
        with pytest.raises(HotcoldError) as excinfo:
            load_model(folder, dtype="float32")
        message = _one_line_error(excinfo)
        assert "truncated" in message and f"expected {full} bytes, found {full - cut}" in message, message


def test_corrupt_safetensors_headers(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama") / "model.safetensors"
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    folder = _copy(tiny_checkpoint("llama"), tmp_path / "bad")
    path = folder / "model.safetensors"

    path.write_bytes(struct.pack("<Q", n) + b"{" * n + raw[8 + n:])  # not JSON
    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    assert "corrupt safetensors" in _one_line_error(excinfo)

    path.write_bytes(struct.pack("<Q", 10 * len(raw)) + raw[8:])  # header length past the end
    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    assert f"expected at least {8 + 10 * len(raw)} bytes, found {len(raw)}" in _one_line_error(excinfo)

    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]  # shape and offsets disagree
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(HotcoldError) as excinfo:
        load_model(folder, dtype="float32")
    message = _one_line_error(excinfo)
    assert "corrupt safetensors" in message and name in message, message


def _tiny_gguf(path) -> int:
    """A small llama GGUF written by gguf-py (F32 and Q8_0 tensors); returns its size in bytes."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((64, 32), dtype=np.float32))
    q8 = gguf.quants.quantize(np.ones((96, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def test_truncated_gguf_gives_bytes_expected_and_found(tmp_path):
    full_path = tmp_path / "full.gguf"
    full = _tiny_gguf(full_path)
    assert GGUFReader(full_path).get("embed.weight").shape == (64, 32)
    raw = full_path.read_bytes()
    cut_path = tmp_path / "cut.gguf"
    for keep in (full - 1, full - 128 - 96 * 68, 64 * 32 * 4):  # inside the last, the middle, the first tensor
        cut_path.write_bytes(raw[:keep])
        with pytest.raises(HotcoldError) as excinfo:
            GGUFReader(cut_path)
        message = _one_line_error(excinfo)
        assert "cannot read GGUF" in message and "truncated" in message, message
        assert f"need {full} bytes, found {keep} ({full - keep} missing)" in message, message
    for keep in (3, 40):  # inside the magic, inside the metadata
        cut_path.write_bytes(raw[:keep])
        with pytest.raises(HotcoldError) as excinfo:
            GGUFReader(cut_path)
        message = _one_line_error(excinfo)
        assert "truncated or corrupt" in message and f"found {keep})" in message, message


def test_corrupt_gguf_tensor_type_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    _tiny_gguf(path)
    reader = gguf.GGUFReader(str(path))
    field = reader.tensors[0].field
    type_offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])  # name len, name, n_dims, dims
    raw = bytearray(path.read_bytes())
    raw[type_offset:type_offset + 4] = struct.pack("<I", 250)
    path.write_bytes(bytes(raw))
    with pytest.raises(HotcoldError) as excinfo:
        GGUFReader(path)
    message = _one_line_error(excinfo)
    assert "corrupt" in message and "token_embd.weight" in message and "250" in message, message


def test_gguf_mlp_biases_are_read(tmp_path):
    """llama GGUFs may carry MLP biases (llama.cpp reads them as optional): hotcold must add them, not drop
    them. Reference: transformers on the HF checkpoint the GGUF was written from."""
    from tiny_gguf import write_llama_gguf
    from tiny_models import make_tiny_checkpoint

    folder = make_tiny_checkpoint("llama", tmp_path / "hf", mlp_bias=True, tie_word_embeddings=False)
    write_llama_gguf(folder, tmp_path / "biased.gguf")
    loaded = load_model(tmp_path / "biased.gguf", dtype="float32")
    assert loaded.config.mlp_bias and loaded.model.layers[0].ffn.down_bias is not None
    ids = torch.tensor(list(range(3, 30)))
    got = loaded.model.forward_sequence(ids)
    want = _transformers_logits(folder, ids.tolist())
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_quantized_ffn_is_seen_from_the_header(tmp_path):
    """`--device cuda --plan` keeps a quantized GGUF's FFN in blocks (quantized hot rows): decided from the
    file's header alone, before loading; a float GGUF or a Hugging Face folder loads as floats."""
    from tiny_gguf import write_llama_gguf
    from tiny_models import make_tiny_checkpoint

    from hotcold.engine.loader import holds_quantized_ffn

    folder = make_tiny_checkpoint("llama", tmp_path / "hf")
    assert not holds_quantized_ffn(write_llama_gguf(folder, tmp_path / "f32.gguf"))
    assert holds_quantized_ffn(write_llama_gguf(folder, tmp_path / "q8.gguf", qtype="Q8_0"))
    assert not holds_quantized_ffn(folder)


def test_streamed_copy_of_a_mapping(tmp_path):
    """Loading copies each GGUF tensor out of its file mapping in pieces, dropping each piece's pages: the
    copy is byte for byte the file's, over piece boundaries that fall inside pages and rows."""
    import numpy as np

    from hotcold.engine.gguf_weights import _streamed_copy

    data = np.random.default_rng(0).integers(0, 256, size=(37, 1234), dtype=np.uint8)
    path = tmp_path / "t.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=data.shape)
    for chunk in (4096, 5000, 1 << 20):
        got = _streamed_copy(mapped, chunk)
        assert got.shape == data.shape and np.array_equal(got, data) and not np.shares_memory(got, mapped)
