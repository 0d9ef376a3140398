"""`hotcold loadtest`: statistics on hand-computed records, traffic shape, and runs against a fake
OpenAI-compatible streaming server on 127.0.0.1 that fails, stalls and drops some requests."""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from fake_openai import FakeServer, run_loadtest

from hotcold.cli import main as cli_main
from hotcold.engine.errors import HotcoldError
from hotcold.server import loadtest_data
from hotcold.server.loadtest_stats import RequestRecord, format_summary, parse_goodput_item, summarize

# ---------------------------------------------------------------- statistics on fixed records


def _records() -> list[RequestRecord]:
    return [
        RequestRecord(0, prompt_tokens=10, max_tokens=11, success=True, output_tokens=11,
                      ttft=0.1, latency=1.1, itl=[0.1] * 10),
        RequestRecord(1, prompt_tokens=20, max_tokens=5, success=True, output_tokens=5,
                      ttft=0.3, latency=0.5, itl=[0.05] * 4),
        RequestRecord(2, prompt_tokens=30, max_tokens=1, success=True, output_tokens=1,
                      ttft=0.2, latency=0.2),
        RequestRecord(3, prompt_tokens=40, max_tokens=8, success=False, error="HTTP 503: busy",
                      latency=0.01),
    ]


def test_summary_matches_hand_computed_values():
    s = summarize(_records(), duration_s=2.0)
    assert (s["successful_requests"], s["failed_requests"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 17)  # failed request not counted
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.5)
    assert s["total_token_throughput"] == pytest.approx(38.5)
    assert s["request_goodput"] is None
    # TTFT 100, 300, 200 ms -> sorted 100, 200, 300; p90 at rank 1.8 -> 200 + 0.8 * 100.
    assert s["ttft_ms"] == pytest.approx({"mean": 200, "median": 200, "p90": 280, "p99": 298, "count": 3})
    # TPOT: (1.1-0.1)/10 = 100 ms, (0.5-0.3)/4 = 50 ms; the 1-token request has none.
    assert s["tpot_ms"] == pytest.approx({"mean": 75, "median": 75, "p90": 95, "p99": 99.5, "count": 2})
    # ITL: ten gaps of 100 ms and four of 50 ms.
    itl = {"mean": 1200 / 14, "median": 100, "p90": 100, "p99": 100, "count": 14}
    assert s["itl_ms"] == pytest.approx(itl)
    # E2EL 1100, 500, 200 -> sorted 200, 500, 1100; p90 = 500 + 0.8 * 600, p99 = 500 + 0.98 * 600.
    assert s["e2el_ms"] == pytest.approx({"mean": 600, "median": 500, "p90": 980, "p99": 1088, "count": 3})
    assert s["errors"] == {"HTTP 503: busy": 1}


@pytest.mark.parametrize(
    ("slos", "good"),
    [({"ttft": 250}, 2), ({"ttft": 250, "e2el": 1000}, 1), ({"tpot": 60}, 2), ({"e2el": 100}, 0),
     ({"ttft": 1000, "tpot": 1000, "e2el": 5000}, 3)],
)
def test_goodput_counts_requests_within_every_slo(slos, good):
    assert summarize(_records(), duration_s=2.0, slos_ms=slos)["request_goodput"] == pytest.approx(good / 2.0)


def test_summary_of_no_success_and_table():
    s = summarize([_records()[3]], duration_s=1.0)
    assert s["successful_requests"] == 0 and s["ttft_ms"]["mean"] == 0.0 and s["output_throughput"] == 0.0
    table = format_summary(summarize(_records(), 2.0, {"ttft": 250}, max_concurrency=4))
    lines = table.splitlines()
    rows = {line[:40].strip(): line[40:].strip() for line in lines if len(line) == 50 and line[:1].isalpha()}
    assert rows["Successful requests:"] == "3" and rows["Failed requests:"] == "1"
    assert rows["Maximum request concurrency:"] == "4"
    assert rows["Request goodput (req/s):"] == "1.00"
    assert rows["Output token throughput (tok/s):"] == "8.50"
    assert rows["P90 TTFT (ms):"] == "280.00" and rows["P99 E2EL (ms):"] == "1088.00"
    assert any(line.endswith("1 x HTTP 503: busy") for line in lines)


@pytest.mark.parametrize("text", ["ttft", "ttft:", "foo:10", "tpot:-1", "e2el:abc"])
def test_goodput_argument_rejects_bad_items(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_goodput_item(text)
    assert parse_goodput_item("TPOT:12.5") == ("tpot", 12.5)


# ---------------------------------------------------------------- traffic shape and prompts


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_the_gamma_mean_and_spread(burstiness):
    gaps = loadtest_data.arrival_gaps(40_001, rate=5.0, burstiness=burstiness, rng=np.random.default_rng(1))
    assert gaps[0] == 0.0
    # gamma(shape=B, scale=1/(rate*B)): mean 1/rate, coefficient of variation 1/sqrt(B).
    assert gaps[1:].mean() == pytest.approx(0.2, rel=0.03)
    assert gaps[1:].std() / gaps[1:].mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert not loadtest_data.arrival_gaps(10, math.inf, burstiness, np.random.default_rng(0)).any()


def test_lengths_stay_in_range_and_prompts_use_the_tokenizer():
    lens = loadtest_data.draw_lengths(2000, 100, 0.2, np.random.default_rng(0))
    assert min(lens) == 80 and max(lens) == 120
    assert loadtest_data.draw_lengths(5, 1, 0.5, np.random.default_rng(0)) == [1] * 5

    class CharTokenizer:  # one token per character: an independent, exact count
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    prompts = loadtest_data.random_prompts(5, 37, 9, 0.0, np.random.default_rng(0), CharTokenizer())
    assert all(len(p.text) == 37 and p.prompt_tokens == 37 and p.max_tokens == 9 for p in prompts)
    approx = loadtest_data.random_prompts(5, 12, 3, 0.0, np.random.default_rng(0))
    assert all(len(p.text.split()) == 12 and p.prompt_tokens == 12 for p in approx)


def test_loadtest_module_does_not_import_torch():
    code = "import sys, hotcold.cli, hotcold.server.loadtest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def _cycle(n: int) -> str:
    return "ok" if n == 0 else ("fail", "stall", "drop", "ok")[(n - 1) % 4]


def test_failures_and_stalls_are_counted_and_the_run_ends_on_time(tmp_path, capsys):
    with FakeServer(_cycle) as server:
        start = time.perf_counter()
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "12", "--max-concurrency", "4",
                                  "--input-len", "16", "--output-len", "5", "--timeout", "1.5",
                                  "--goodput", "e2el:10000")
        elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0 and result is not None
    # Requests 1..12 after the test request: 3 of each behaviour.
    s, reqs = result["summary"], result["requests"]
    assert (s["successful_requests"], s["failed_requests"]) == (3, 9)
    errors = [r["error"] for r in reqs if not r["success"]]
    assert sum("HTTP 503: queue full" in e for e in errors) == 3
    assert sum("timeout" in e.lower() for e in errors) == 3
    assert len(errors) == 9 and all(errors)
    stalled = [r for r in reqs if "timeout" in r["error"].lower()]
    assert all(1.4 < r["latency"] < 4.0 for r in stalled)
    # 3 waves of 4 requests, each bounded by the 1.5 s timeout: ~5 s, at most 12 on a busy machine.
    assert elapsed < 12
    ok = [r for r in reqs if r["success"]]
    assert all(r["output_tokens"] == 5 and r["output_tokens_source"] == "usage" for r in ok)
    assert all(r["prompt_tokens"] == 7 for r in ok)  # the server's usage replaces the estimate
    assert s["total_output_tokens"] == 15 and s["request_goodput"] == pytest.approx(3 / s["duration_s"])
    # The fake server waits 50 ms before the first chunk and 10 ms between chunks.
    assert s["ttft_ms"]["median"] >= 50 and s["itl_ms"]["median"] >= 10 and s["itl_ms"]["count"] == 12
    assert "Failed requests:" in out and "approximate counts (1 token per word" in out
    assert server.peak <= 4


def test_concurrency_cap_prompt_shape_and_chunk_counting(tmp_path):
    with FakeServer(lambda n: "ok", usage=False, words_per_chunk=2, first_delay=0.3) as server:
        rc, result = run_loadtest(server.url, tmp_path, "--endpoint", "/v1/chat/completions",
                                  "--num-prompts", "9", "--max-concurrency", "3", "--input-len", "20",
                                  "--output-len", "4", "--range-ratio", "0.5", "--seed", "3")
    assert rc == 0 and result["summary"]["failed_requests"] == 0
    assert server.peak == 3
    # A request waits for a free slot before it is sent (and timed): the 4th goes out only after one of
    # the first 3 has finished, which takes at least the server's 0.3 s first-chunk delay.
    sent = sorted(r["sent_at"] for r in result["requests"])
    assert sent[3] >= 0.3 and all(r["ttft"] >= 0.3 for r in result["requests"])
    bodies = server.bodies[1:]  # after the test request
    assert len(bodies) == 9 and all(b["stream"] and b["model"] == "fake-model" for b in bodies)
    words = [len(b["messages"][0]["content"].split()) for b in bodies]
    assert all(10 <= w <= 30 for w in words) and len(set(words)) > 1
    assert all(2 <= b["max_tokens"] <= 6 for b in bodies)
    # No usage from this server: one output token counted per content chunk. (Requests reach the server in
    # whatever order their slots free up, so records and bodies are compared as sets, not in order.)
    for rec in result["requests"]:
        assert rec["output_tokens_source"] == "chunks" and rec["output_tokens"] == rec["max_tokens"]
    assert sorted(r["max_tokens"] for r in result["requests"]) == sorted(b["max_tokens"] for b in bodies)


def test_request_rate_spaces_the_sends(tmp_path):
    with FakeServer(lambda n: "ok", first_delay=0.0, gap=0.0) as server:
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "6", "--request-rate", "10",
                                  "--burstiness", "2", "--output-len", "2", "--seed", "5")
    assert rc == 0
    sent = [r["sent_at"] for r in result["requests"]]
    assert sent == sorted(sent) and sent[0] < 0.25
    # Same seed, same schedule: the gaps the client drew (arrival stream of SeedSequence(5)).
    rng = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[1])
    expected = np.cumsum(loadtest_data.arrival_gaps(6, 10.0, 2.0, rng))
    late = [t - e for t, e in zip(sent, expected, strict=True)]
    assert min(late) >= -0.01, late  # never early
    assert sorted(late)[len(late) // 2] <= 0.25 and max(late) <= 1.0, late  # and not much late


def test_overall_deadline_cancels_stalled_requests(tmp_path):
    with FakeServer(lambda n: "ok" if n == 0 else "stall") as server:
        start = time.perf_counter()
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "6", "--max-concurrency", "2",
                                  "--output-len", "2", "--timeout", "30", "--max-duration", "1")
        elapsed = time.perf_counter() - start
    assert elapsed < 6
    assert rc == 1  # nothing succeeded
    assert result["summary"]["failed_requests"] == 6
    assert all("overall deadline" in r["error"] for r in result["requests"])


def test_ctrl_c_keeps_what_finished(tmp_path):
    # two requests finish, two stall in flight, two wait for a slot; then SIGINT, as Ctrl-C sends
    with FakeServer(lambda n: "ok" if n <= 2 else "stall") as server:
        out = tmp_path / "r.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotcold.cli", "loadtest", "--base-url", server.url, "--no-progress",
             "--num-prompts", "6", "--max-concurrency", "2", "--output-len", "2", "--save-result", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(server.bodies) < 5 or server.in_flight < 2:  # the test request, 2 done, 2 stalled
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # a second press while the first is handled loses nothing either
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted (Ctrl-C): 4 of 6 requests were sent" in stdout
    result = json.loads(out.read_text())
    assert result["interrupted"] is True
    s = result["summary"]
    assert (s["successful_requests"], s["failed_requests"]) == (2, 2)
    assert s["total_output_tokens"] == 4 and s["e2el_ms"]["count"] == 2
    errors = sorted(r["error"] for r in result["requests"])
    assert errors == ["", "", "cancelled: interrupted (Ctrl-C)", "cancelled: interrupted (Ctrl-C)",
                      "not sent: interrupted (Ctrl-C)", "not sent: interrupted (Ctrl-C)"]
    assert [r["sent"] for r in result["requests"]].count(True) == 4


def test_ctrl_c_after_the_run_skips_only_the_metrics(tmp_path):
    # every request done; the server's /metrics (read for its prefix-cache counts) hangs: Ctrl-C skips that read
    with FakeServer(lambda n: "ok", slow_metrics=60) as server:
        out = tmp_path / "r.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotcold.cli", "loadtest", "--base-url", server.url, "--no-progress",
             "--num-prompts", "3", "--output-len", "2", "--save-result", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.metrics_reads < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "prefix-cache counts are left out" in stdout and "Serving Benchmark Result" in stdout
    result = json.loads(out.read_text())
    assert result["interrupted"] is False and result["summary"]["successful_requests"] == 3


def test_failing_first_request_aborts_with_one_line(tmp_path, capsys):
    with FakeServer(lambda n: "fail") as server:
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "4", "--output-len", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and result is None and len(server.bodies) == 1
    assert len(err) == 1 and err[0].startswith("hotcold loadtest: error: the first test request")
    assert "HTTP 503: queue full" in err[0]


def test_unreachable_server_and_bad_arguments_give_one_line(tmp_path, capsys):
    with socket.socket() as s:  # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _ = run_loadtest(f"http://127.0.0.1:{port}", tmp_path, "--model", "m", "--timeout", "5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "first test request" in err[0] and "ConnectError" in err[0]
    rc, _ = run_loadtest(f"http://127.0.0.1:{port}", tmp_path, "--timeout", "5")  # no --model: listing fails
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "/v1/models" in err[0]
    for bad in (["--num-prompts", "0"], ["--burstiness", "0"], ["--range-ratio", "1"],
                ["--input-len", str(10**8)], ["--seed", "-1"], ["--temperature", "nan"],
                ["--tokenizer", str(tmp_path / "no-such-model")]):
        rc, _ = run_loadtest("http://127.0.0.1:1", tmp_path, "--model", "m", *bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and bad[0] in err[0], err
    # where the result cannot be written is said before the run, not after it
    for where in (tmp_path, tmp_path / "no-such-dir" / "r.json"):
        rc = cli_main(["loadtest", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--save-result",
                       str(where)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "--save-result" in err[0], err
    rc = cli_main(["loadtest", "--base-url", "http://127.0.0.1:99999", "--model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "port 99999" in err[0], err
    binary, bad_max = tmp_path / "bin.jsonl", tmp_path / "max.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    bad_max.write_text(json.dumps({"prompt": "hi", "max_tokens": "abc"}) + "\n")
    for dataset, needle in ((binary, "not UTF-8"), (bad_max, "max_tokens")):
        rc, _ = run_loadtest(f"http://127.0.0.1:{port}", tmp_path, "--model", "m", "--dataset", str(dataset))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0], err


def test_prompts_sized_with_the_tokenizer_of_the_served_model(tmp_path, tiny_checkpoint, capsys):
    from tokenizers import Tokenizer

    folder = tiny_checkpoint("llama")
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    server = FakeServer(lambda n: "ok", usage=False, first_delay=0.0, gap=0.0)
    server.root = str(folder)  # /v1/models names the model's folder, as vLLM's `root` does
    with server:
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "4", "--input-len", "24",
                                  "--output-len", "2")
    assert rc == 0 and f"prompts: tokenizer of {folder}" in capsys.readouterr().out
    for body, rec in zip(server.bodies[1:], result["requests"], strict=True):
        count = len(reference.encode(body["prompt"], add_special_tokens=False).ids)
        assert abs(count - 24) <= 1 and rec["prompt_tokens"] == count


def test_prompts_sized_with_the_servers_tokenizer(tmp_path, tiny_checkpoint, capsys):
    # no local copy of the model: the server's /tokenize sizes the prompts (here a reference tokenizer behind it,
    # one that adds a BOS to every text, as Llama's does: counted, but never written into the prompt)
    from tiny_models import BOS_ID, SPECIAL_TOKENS
    from tokenizers import Tokenizer, processors

    reference = Tokenizer.from_file(str(tiny_checkpoint("llama") / "tokenizer.json"))
    bos = SPECIAL_TOKENS[BOS_ID]
    reference.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, BOS_ID)])
    with FakeServer(lambda n: "ok", usage=False, first_delay=0.0, gap=0.0, tokenizer=reference) as server:
        rc, result = run_loadtest(server.url, tmp_path, "--num-prompts", "4", "--input-len", "24",
                                  "--output-len", "2")
    assert rc == 0 and "prompts: the server's tokenizer (/tokenize)" in capsys.readouterr().out
    for body, rec in zip(server.bodies[1:], result["requests"], strict=True):
        assert bos not in body["prompt"]
        ids = reference.encode(body["prompt"]).ids
        assert ids[0] == BOS_ID and abs(len(ids) - 24) <= 1 and rec["prompt_tokens"] == len(ids)


def test_word_prompts_are_one_token_per_word_for_the_default_model(default_model_path):
    from hotcold.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path)
    for prompt in loadtest_data.random_prompts(4, 100, 1, 0.0, np.random.default_rng(2)):
        assert len(tok.encode(prompt.text, add_special_tokens=False)) == 100


def test_jsonl_dataset(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "12345678"}, {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = loadtest_data.file_prompts(str(data), 5, 7, chat=True)
    assert [p.max_tokens for p in prompts] == [7, 3, 7, 3, 7]  # cycled; the file's max_tokens wins
    assert prompts[0].text == "12345678" and prompts[0].prompt_tokens == 2  # ~4 characters a token
    assert prompts[1].messages == rows[1]["messages"] and prompts[1].text is None
    with FakeServer(lambda n: "ok", first_delay=0.0, gap=0.0) as server:
        rc, result = run_loadtest(server.url, tmp_path, "--endpoint", "/v1/chat/completions",
                                  "--dataset", str(data), "--num-prompts", "4")
    assert rc == 0 and result["summary"]["successful_requests"] == 4
    # the test request (prompt 0), then prompts 0, 1, 0, 1 concurrently: in any order of arrival
    first = [{"role": "user", "content": "12345678"}]
    assert server.bodies[0]["messages"] == first
    sent = sorted(json.dumps(b["messages"]) for b in server.bodies[1:])
    assert sent == sorted(json.dumps(m) for m in [first, rows[1]["messages"]] * 2)
    for bad, message in (('{"prompt": 1}', "'prompt' or 'messages'"), ("{oops", "not JSON")):
        data.write_text(bad + "\n")
        rc, _ = run_loadtest("http://127.0.0.1:1", tmp_path, "--model", "m", "--dataset", str(data))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and f"{data}:1" in err[0] and message in err[0]
    data.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(HotcoldError, match="needs --endpoint /v1/chat/completions"):
        loadtest_data.file_prompts(str(data), 1, 7, chat=False)
