"""`hotcold serve` start-up and shutdown, each test with its own process: /health is 503 while the model
loads, SIGTERM answers new requests 503 and drains running ones within the grace period, then exits 0, and
start-up errors are one line with exit code 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import ServerProcess


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


def _stream_in_thread(url: str, body: dict, first_chunk: threading.Event, result: dict) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                chunks = []
                for line in resp.iter_lines():
                    if line:
                        chunks.append(line)
                        first_chunk.set()
                result["events"] = [c.removeprefix("data: ") for c in chunks]
                result["done_at"] = time.monotonic()
        except httpx.HTTPError as exc:
            result["error"] = exc
        finally:
            first_chunk.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _hold_file(path: Path) -> bytes:
    """Swap `path` for a FIFO: whoever opens it to read waits until `_release` writes the original bytes."""
    data = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return data


def _release(path: Path, data: bytes) -> None:
    with open(path, "wb") as fifo:  # returns once the reader has opened its end
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # any later read finds a plain file
        fifo.write(data)


def test_loading_then_sigterm_drains_running_requests(tmp_path):
    from tiny_models import make_tiny_checkpoint

    # the engine thread's read of config.json blocks on a FIFO, so the loading phase lasts until released;
    # 4096 positions so that the stream below outlasts the checks made while it runs
    model = make_tiny_checkpoint("llama", tmp_path / "held", max_position_embeddings=4096)
    held = _hold_file(model / "config.json")
    srv = ServerProcess("--model", str(model), "--grace-period", "30")
    releaser = threading.Thread(target=_release, args=(model / "config.json", held), daemon=True)
    try:
        # /health says 503 while the engine thread loads the model; /v1 answers 503 in OpenAI's envelope
        early = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert early.status_code == 503 and early.json()["error"]["code"] == "service_unavailable", early.text
        r = httpx.get(f"{srv.url}/health", timeout=30)
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        releaser.start()
        seen = srv.wait_ready()
        assert seen[-1] == (200, {"status": "ok"})
        short, first = {}, threading.Event()
        body = {"prompt": "Hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        ts = _stream_in_thread(srv.url, body, first, short)
        assert first.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        # admission stops at once: the socket stays open and answers 503 until the running request is done
        r = httpx.get(f"{srv.url}/health", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503, r.text
        assert r.json() == {"error": {"message": "the server is shutting down", "type": "server_error",
                                      "param": None, "code": "service_unavailable"}}
        assert r.headers["connection"] == "close"
        assert "events" not in short, "the stream ended before the checks: they proved nothing"
        rc = srv.proc.wait(60)
        exited = time.monotonic()
        ts.join(10)
    finally:
        if not releaser.is_alive() and not releaser.ident:  # still held: let the engine thread go
            releaser.start()
        srv.stop()
    assert rc == 0, srv.output()
    assert "Traceback" not in srv.output()
    # the running request finished in full within the grace period, and the server exited right after it
    assert "error" not in short, short
    print(f"last token to exit: {exited - short['done_at']:.2f}s")
    assert exited - short["done_at"] < 10, "the server outlived its last request: it should end when it does"
    events = short["events"]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 2000
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
    assert finish[-1] == "length"
    with pytest.raises(httpx.TransportError):  # and now the listener is closed
        httpx.get(f"{srv.url}/health", timeout=5)


def test_sigterm_cuts_requests_that_outlast_the_grace_period(tmp_path):
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "tiny4k", max_position_embeddings=4096)
    srv = ServerProcess("--model", str(path), "--grace-period", "1")
    srv.wait_ready()
    result, first = {}, threading.Event()
    t = _stream_in_thread(srv.url, {"prompt": "Hi", "max_tokens": 4000, "ignore_eos": True, "stream": True,
                                    "temperature": 0}, first, result)
    assert first.wait(30)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(30)
    elapsed = time.monotonic() - t0
    t.join(10)
    assert rc == 0 and "Traceback" not in srv.output(), srv.output()
    assert 0.9 < elapsed < 1 + 8
    # the stream still ends properly: a last chunk with finish_reason "abort", then [DONE]
    assert "error" not in result, result
    events = result["events"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) < 4000


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotcold.cli", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_startup_errors_are_one_line(tiny_path, tmp_path):
    r = _run_cli("--model", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("hotcold serve: error: model ")
    r = _run_cli("--model", str(tiny_path), "--max-num-seqs", "0")
    assert r.returncode == 1 and "--max-num-seqs must be at least 1" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run_cli("--model", str(tiny_path), "--port", str(port))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot listen on 127.0.0.1:" in r.stderr
    # a folder that exists but is no model: the engine thread fails, the server exits with one line
    (tmp_path / "empty").mkdir()
    r = _run_cli("--model", str(tmp_path / "empty"), "--port", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("hotcold serve: error:")


def test_serve_with_a_plan_matches_masked_reference(tiny_path, tmp_path):
    """--plan (oracle): the served greedy tokens equal transformers' model with the same neurons zeroed
    (|h_i| * ||down[:, i]|| <= threshold, the plan's rule), and /metrics reports the measured sparsity."""
    import torch
    from live_server import metrics, ref_logprobs
    from tiny_models import reference_model, reference_tokenizer

    from hotcold.engine.loader import load_model
    from hotcold.engine.plan import LayerPlan, Plan, save_plan

    model, tok = reference_model(tiny_path), reference_tokenizer(tiny_path)
    prompt = "Sparse activations let hot neurons live on the GPU"
    ids = tok(prompt)["input_ids"]
    scores: list[torch.Tensor] = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: scores.append((args[0].abs() * mod.weight.norm(dim=0)).flatten()))
        for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    thresholds = [float(s.median()) for s in scores]  # about half the neurons off in every layer
    inter = model.config.intermediate_size
    layers = [LayerPlan(index=i, threshold=t, cett=0.0, sparsity=0.5, num_neurons=inter,
                        hot_ids=torch.arange(0), frequency=torch.zeros(inter)) for i, t in enumerate(thresholds)]
    save_plan(Plan(fingerprint=load_model(tiny_path).fingerprint, layers=layers), tmp_path / "plan")

    srv = ServerProcess("--model", str(tiny_path), "--plan", str(tmp_path / "plan"), "--sparsity", "oracle")
    try:
        srv.wait_ready()
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}).json()
        out = [int(t.removeprefix("token_id:")) for t in r["choices"][0]["logprobs"]["tokens"]]
        sparsity = metrics(srv.url)["hotcold:ffn_sparsity"]
    finally:
        assert srv.stop() == 0
    for layer, t in zip(model.model.layers, thresholds, strict=True):
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, t=t: (args[0] * (args[0].abs() * mod.weight.norm(dim=0) > t),))
    lp = ref_logprobs(model, ids + out)
    for i, tid in enumerate(out):
        row = lp[len(ids) + i - 1]
        assert row[tid] >= row.max() - 1e-3, f"token {i} differs from the masked reference"
    assert 0.3 < sparsity < 0.7, sparsity
