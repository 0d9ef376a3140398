"""The command line: perplexity against transformers, generation, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import reference_model

from hotcold.engine.errors import HotcoldError
from hotcold.engine.loader import load_model

TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. " * 6
        + "Sparse activations let hot neurons live on the GPU while cold neurons stay on the CPU. " * 4)


def hotcold(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HOTCOLD_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hotcold.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_perplexity_equals_transformers(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    result = hotcold("perplexity", "--model", str(path), "--text", str(text_file), "--context", "32",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    ours = float(result.stdout.split()[1])

    ids = load_model(path).tokenizer.encode(TEXT)
    ref = reference_model(path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            window = torch.tensor([ids[start: start + 32]])
            if window.shape[1] < 2:
                continue
            logp = ref(window).logits[0, :-1].double().log_softmax(-1)
            nll -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_generate_streams_a_completion(tiny_checkpoint):
    result = hotcold("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", "Hello", "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(tiny_checkpoint, tmp_path):
    good = tiny_checkpoint("llama")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _assert_one_line_error(hotcold("generate", "--model", str(corrupt), "--prompt", "x"), "safetensors")

    missing = tmp_path / "missing_key"
    missing.mkdir()
    for f in good.iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((good / "config.json").read_text())
    del cfg["hidden_size"]
    (missing / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(hotcold("generate", "--model", str(missing), "--prompt", "x"), "hidden_size")

    unknown = tmp_path / "unknown_arch"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    _assert_one_line_error(hotcold("generate", "--model", str(unknown), "--prompt", "x"), "unsupported architecture")

    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x01" * 64)
    _assert_one_line_error(hotcold("generate", "--model", str(bad_gguf), "--prompt", "x"), "GGUF")

    _assert_one_line_error(hotcold("generate", "--model", str(good), "--prompt", ""), "empty")
    _assert_one_line_error(hotcold("perplexity", "--model", str(good), "--text", str(tmp_path / "nope.txt")),
                           "no such file")
    _assert_one_line_error(hotcold("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"), "not found")
    # flags a user mistypes: named in one line before anything loads (generate's prompt not echoed first)
    cpus = len(os.sched_getaffinity(0))
    for flags, needle in [(("--device", "tpu"), "expected cpu, cuda or cuda:N"), (("--threads", "0"), "expected 1 to"),
                          (("--threads", "100000"), f"expected 1 to {cpus}"),  # crashed libgomp; 1000 took minutes
                          (("--max-tokens", "0"), "max_tokens must be at least 1"),
                          (("--seed", str(10**23)), "seed must fit in 64 bits"),
                          (("--temperature", "inf"), "finite")]:
        bad = hotcold("generate", "--model", str(good), "--prompt", "x", *flags)
        _assert_one_line_error(bad, needle)
        assert bad.stdout == ""
    not_utf8 = subprocess.run([sys.executable, "-m", "hotcold.cli", "generate", "--model", str(good), "--prompt",
                               b"abc\xff\xfe"], capture_output=True, text=True, timeout=120)
    _assert_one_line_error(not_utf8, "not valid UTF-8")
    _assert_one_line_error(subprocess.run(
        [sys.executable, "-m", "hotcold.cli", "generate", "--model", str(good), "--prompt", "x"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOTCOLD_THREADS": "abc"}),
        "HOTCOLD_THREADS='abc'")
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 20)
    for flags, needle in [(("--max-tokens", "-3"), "at least 2 tokens"),  # was read as a slice: all but 3
                          (("--context", "1000"), "maximum context is 256 tokens")]:
        _assert_one_line_error(hotcold("perplexity", "--model", str(good), "--text", str(text), *flags), needle)
    # serve took --max-model-len 100000 on a 256-token model and clamped it in silence
    served = hotcold("serve", "--model", str(good), "--port", "0", "--max-model-len", "100000")
    assert served.returncode == 1 and "maximum context is 256" in served.stderr.strip().splitlines()[-1]
    if not torch.cuda.is_available():
        _assert_one_line_error(hotcold("generate", "--model", str(good), "--prompt", "x", "--device", "cuda"),
                               "no usable GPU")
        _assert_one_line_error(hotcold("serve", "--model", str(good), "--device", "cuda", "--port", "0"),
                               "no usable GPU")


def test_loader_errors_are_hotcold_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HotcoldError, match="invalid JSON"):
        load_model(tmp_path)


def test_gpu_memory_places_the_plan_or_says_which_flag_to_lower(tiny_checkpoint, tmp_path):
    """--gpu-memory at generate time: the plan's hot neurons re-placed after the dense parts and this run's KV
    cache (sized from the prompt's bytes, a few tokens of room and --max-tokens; the line on stderr), or, when
    those alone do not fit, one line naming the flag to lower."""
    from test_hybrid import make_plan

    from hotcold.engine.placement import dense_parts
    from hotcold.engine.plan import save_plan

    path = tiny_checkpoint("relu_llama")
    loaded = load_model(path, dtype="float32")
    save_plan(make_plan(loaded, "random"), tmp_path / "plan")
    context = len(b"Hello") + 8 + 3  # prompt bytes, room for special tokens, --max-tokens
    need = sum(dense_parts(loaded.model, 4, 0, context, 1).values())
    common = ("generate", "--model", str(path), "--dtype", "float32", "--plan", str(tmp_path / "plan"),
              "--sparsity", "oracle", "--prompt", "Hello", "--max-tokens", "3")
    fits = hotcold(*common, "--gpu-memory", str(need + 4 * 1024))
    assert fits.returncode == 0, fits.stderr
    assert "hot neurons" in fits.stderr and f"KV cache of 1 x {context} tokens" in fits.stderr
    _assert_one_line_error(hotcold(*common, "--gpu-memory", str(need - 1)), "--max-tokens")
    # perplexity scores without a KV cache: it reserves none, and has no flag of that kind to name
    (tmp_path / "text.txt").write_text("Hello world. " * 8)
    scored = ("perplexity", "--model", str(path), "--dtype", "float32", "--plan", str(tmp_path / "plan"),
              "--sparsity", "oracle", "--text", str(tmp_path / "text.txt"))
    bare = sum(dense_parts(loaded.model, 4, 0, 0, 0).values())
    fits = hotcold(*scored, "--gpu-memory", str(bare + 4 * 1024))
    assert fits.returncode == 0 and "KV cache of 0 x 0 tokens" in fits.stderr, fits.stderr
    _assert_one_line_error(hotcold(*scored, "--gpu-memory", str(bare - 1)), "give a larger --gpu-memory")


def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    # Ctrl-C in the seconds that `import torch` takes used to print KeyboardInterrupt's traceback
    from hotcold import cli

    def interrupted_import(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted_import)
    assert cli.main(["generate", "--model", "default", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "hotcold: interrupted\n"
