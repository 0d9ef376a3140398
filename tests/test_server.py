"""`hotcold serve` as a real process on loopback with a tiny random Llama, driven by the official `openai`
client and raw httpx. References are independent of the server: transformers' model and tokenizer for
logprobs, greedy tokens and prompt lengths; the same request sent alone for batch invariance."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from live_server import AUTH, KEY, ServerProcess, api_test_server, metrics, post, ref_logprobs, sse_events
from tiny_models import reference_model, reference_tokenizer

PROMPT = "The capital of France is"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    yield from api_test_server(tmp_path_factory.mktemp("srv"))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(server: ServerProcess):
    return reference_model(server.model_path), reference_tokenizer(server.model_path)


# -------------------------------------------------------------------------------------- basic routes
def test_health_models_and_auth(server: ServerProcess, client: openai.OpenAI):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    # outside /v1 no key is needed
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert httpx.head(f"{server.url}/health").status_code == 200  # load balancers probe with HEAD
    # a browser's CORS preflight is answered without the key, and the answer allows the origin (any, by default)
    pre = httpx.options(f"{server.url}/v1/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://app.example")


def test_greedy_completion_matches_transformers(server, client, ref):
    model, tok = ref
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    ch = r.choices[0]
    prompt_ids = tok(PROMPT)["input_ids"]
    out_ids = [int(t.removeprefix("token_id:")) for t in ch.logprobs.tokens]
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert ch.finish_reason == "length" and ch.index == 0
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(out_ids) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert ch.text == tok.decode(out_ids)
    lp = ref_logprobs(model, prompt_ids + out_ids)
    for i, tid in enumerate(out_ids):
        row = lp[len(prompt_ids) + i - 1]
        assert row[tid] >= row.max() - 1e-4, f"token {i} is not the reference argmax"
        assert ch.logprobs.token_logprobs[i] == pytest.approx(float(row[tid]), abs=2e-3)
        top = ch.logprobs.top_logprobs[i]
        ref_top = {f"token_id:{int(j)}": float(row[j]) for j in row.topk(3).indices}
        assert set(ref_top) <= set(top)
        for k, v in ref_top.items():
            assert top[k] == pytest.approx(v, abs=2e-3)


def test_prompt_forms_give_the_same_completions(server, client, ref):
    _, tok = ref
    prompts = [PROMPT, "Hello world! This"]
    ids = [tok(p)["input_ids"] for p in prompts]
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    as_text = client.completions.create(prompt=prompts, **kw)
    as_ids = client.completions.create(prompt=ids, **kw)
    one = client.completions.create(prompt=ids[1], **kw)
    assert [c.index for c in as_text.choices] == [0, 1]
    assert [c.text for c in as_text.choices] == [c.text for c in as_ids.choices]
    assert one.choices[0].text == as_text.choices[1].text
    assert as_text.usage.prompt_tokens == len(ids[0]) + len(ids[1]) == as_ids.usage.prompt_tokens
    assert as_text.usage.completion_tokens == 12


def test_n_seed_and_sampling_filters(server, client, ref):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, extra_body={"ignore_eos": True})
    a = client.completions.create(n=3, temperature=1.0, seed=7, **kw)
    b = client.completions.create(n=3, temperature=1.0, seed=7, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "n choices of a sampled request should differ"
    n_prompt = len(ref[1](PROMPT)["input_ids"])  # transformers' count
    assert a.usage.completion_tokens == 30 and a.usage.prompt_tokens == n_prompt  # once, not once per choice
    two = client.completions.create(model="tiny", prompt=[PROMPT, "x"], n=2, max_tokens=2, temperature=0)
    assert two.usage.prompt_tokens == n_prompt + len(ref[1]("x")["input_ids"])
    # null means the default (one choice), as OpenAI and vLLM take it
    assert len(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": None}).json()["choices"]) == 1
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    # top_k=1 and min_p=1 keep only the argmax: sampling must reduce to greedy
    assert client.completions.create(temperature=1.5, top_p=0.9, extra_body={"top_k": 1, "ignore_eos": True},
                                     **{k: v for k, v in kw.items() if k != "extra_body"}).choices[0].text == greedy
    assert client.completions.create(temperature=1.5, extra_body={"min_p": 1.0, "ignore_eos": True},
                                     **{k: v for k, v in kw.items() if k != "extra_body"}).choices[0].text == greedy
    pen = client.completions.create(temperature=0, presence_penalty=2.0, frequency_penalty=2.0,
                                    extra_body={"repetition_penalty": 50.0, "ignore_eos": True},  # <= 100
                                    **{k: v for k, v in kw.items() if k != "extra_body"})
    assert pen.choices[0].finish_reason == "length" and pen.usage.completion_tokens == 10


def test_stop_strings(server, client):
    kw = dict(model="tiny", prompt=PROMPT, temperature=0)
    full = client.completions.create(max_tokens=40, extra_body={"ignore_eos": True}, **kw).choices[0].text
    # a stop string of two printable ASCII characters that first occurs after the start of the text
    start = next(i for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    r = client.completions.create(max_tokens=40, stop=[stop, "@@never@@"], **kw).choices[0]
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"


def test_echo_and_prompt_logprobs(server, client, ref):
    model, tok = ref
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    # scoring request, as lm-eval-harness sends it: echo, logprobs, max_tokens=0
    s = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    ids = tok(PROMPT)["input_ids"]
    lp = ref_logprobs(model, ids)
    got = s.choices[0].logprobs
    assert s.choices[0].text == PROMPT and s.usage.completion_tokens == 0
    assert got.tokens == [f"token_id:{i}" for i in ids] and got.token_logprobs[0] is None
    for t in range(1, len(ids)):
        assert got.token_logprobs[t] == pytest.approx(float(lp[t - 1, ids[t]]), abs=2e-3)
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)


def test_text_offsets_of_characters_split_over_tokens(server, client, ref):
    """Echoed prompt logprobs: a token that holds part of a character (transformers decodes it alone as
    U+FFFD) points at that character; every other token's text starts at its offset."""
    _, tok = ref
    prompt = "Grüße aus Köln 🙂 東京は晴れ end"
    s = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True})
    lp = s.choices[0].logprobs
    ids = [int(x.removeprefix("token_id:")) for x in lp.tokens]
    pieces = [tok.decode([i], skip_special_tokens=True) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the test's point: some character is split
    assert lp.text_offset == sorted(lp.text_offset) and max(lp.text_offset) < len(prompt)
    for offset, piece in zip(lp.text_offset, pieces):
        if "\ufffd" in piece:
            assert len(prompt[offset].encode()) > 1, (offset, piece)
        else:
            assert prompt.startswith(piece, offset), (offset, piece)


def test_chat_template_logprobs_and_object_names(server, client, ref):
    _, tok = ref
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(expected)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens == 7
    assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
    assert "".join(e.token for e in r.choices[0].logprobs.content) == msg.content
    assert b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content).decode("utf-8", "replace") == msg.content
    # list-of-parts content renders like the plain string
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                         {"type": "text", "text": "world!"}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_tokens=7, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r2.choices[0].message.content == msg.content


def test_tokenize_and_detokenize_match_transformers(server, ref):
    _, tok = ref
    want = tok(PROMPT)["input_ids"]
    r = post(server, "/tokenize", {"prompt": PROMPT})
    assert r.status_code == 200 and r.json() == {"count": len(want), "max_model_len": 4096, "tokens": want}
    r = post(server, "/tokenize", {"model": "tiny", "prompt": PROMPT, "add_special_tokens": False})
    assert r.json()["tokens"] == tok(PROMPT, add_special_tokens=False)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    for add in (True, False):
        expected = tok.apply_chat_template(messages, add_generation_prompt=add, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        r = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": add})
        assert r.json()["tokens"] == expected
    ids = want + tok(" Paris, ünd Köln", add_special_tokens=False)["input_ids"]
    r = post(server, "/detokenize", {"model": "tiny", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(ids)}  # special tokens kept, as transformers
    for path, body, status, param in [
            ("/tokenize", {}, 400, "prompt"),
            ("/tokenize", {"prompt": "x", "messages": messages}, 400, "messages"),
            ("/tokenize", {"prompt": "hello " * 10**5}, 400, "prompt"),  # refused before it is encoded
            ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
            ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
            ("/detokenize", {"tokens": [320]}, 400, "tokens"),  # vocabulary: 320
            ("/detokenize", {"tokens": [True]}, 400, "tokens.0"),
            ("/detokenize", {}, 400, "tokens")]:
        r = post(server, path, body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
    r = post(server, "/tokenize", {"prompt": [1, 2]})  # a string only: not the completion prompt's list forms
    assert r.json()["error"] == {"message": "prompt: Input should be a valid string", "type": "invalid_request_error",
                                 "param": "prompt", "code": None}
    r = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi " * 10**5}]})
    assert "the messages have 300000 characters" in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401  # the key guards it


# ----------------------------------------------------------------------------------------- streaming
def test_completion_stream_format(server, client):
    body = {"model": "tiny", "prompt": [PROMPT, "Hello"], "max_tokens": 8, "temperature": 0, "n": 2,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == "tiny" for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    texts: dict[int, str] = {}
    for pos, c in enumerate(text_chunks):
        assert len(c["choices"]) == 1 and c["usage"] is None
        ch = c["choices"][0]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        later = [x["choices"][0]["index"] for x in text_chunks[pos + 1:]]
        assert (ch["finish_reason"] is not None) == (ch["index"] not in later), "finish_reason not last"
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]


def test_chat_stream_via_openai_and_raw(server, client):
    messages = [{"role": "user", "content": "Tell me about the weather today"}]
    kw = dict(model="tiny", messages=messages, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(stream=True, **kw)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # raw: no usage key unless asked; the usage chunk when asked; [DONE] last
    raw_body = {"model": "tiny", "messages": messages, "max_tokens": 9, "temperature": 0, "stream": True,
                "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, json=raw_body) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH,
                      json={**raw_body, "stream_options": {"include_usage": True}}) as resp:
        events = sse_events(resp)
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"] == whole.usage.model_dump(exclude_none=True)


# --------------------------------------------------------------------------------------- bad inputs
# (the table of bad requests: test_server_errors.py)
def test_context_length_code_and_wrong_method(server, client):
    r = post(server, "/v1/completions", {"prompt": [5] * 4000, "max_tokens": 200})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{server.url}/v1/completions", headers=AUTH).status_code == 405
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=5)


# ------------------------------------------------------------------------ disconnects, queue, metrics
def _wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_disconnect_mid_stream_frees_the_slot(server):
    before = metrics(server.url)
    body = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(server.url)["hotcold:num_requests_running"] == 1
    # the client closed the connection: the request must be aborted and its slot freed at once
    assert _wait_for(lambda: metrics(server.url)["hotcold:num_requests_running"] == 0, 5)
    m = metrics(server.url)
    assert m["hotcold:request_aborted_total"] == before["hotcold:request_aborted_total"] + 1
    generated = m["hotcold:generation_tokens_total"] - before["hotcold:generation_tokens_total"]
    assert generated < 3000
    time.sleep(0.3)
    assert metrics(server.url)["hotcold:generation_tokens_total"] == m["hotcold:generation_tokens_total"]
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=1.0,
                   json={**body, "stream": False})
    assert _wait_for(lambda: metrics(server.url)["hotcold:num_requests_running"] == 0, 5)
    assert metrics(server.url)["hotcold:request_aborted_total"] == before["hotcold:request_aborted_total"] + 2


def test_queue_full_gives_429_and_slots_come_back(server, client):
    body = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}
    streams = []
    try:
        for _ in range(16):  # --max-num-seqs 8 + --max-queue 8
            cm = httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60)
            resp = cm.__enter__()
            streams.append((cm, resp))
            assert resp.status_code == 200
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        assert _wait_for(lambda: metrics(server.url)["hotcold:num_requests_running"] == 8)
        assert metrics(server.url)["hotcold:num_requests_waiting"] == 8
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    assert _wait_for(lambda: metrics(server.url)["hotcold:num_requests_running"] == 0, 10)
    assert metrics(server.url)["hotcold:num_requests_waiting"] == 0
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_metrics_follow_a_request(server, client):
    before = metrics(server.url)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = metrics(server.url)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("hotcold:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("hotcold:generation_tokens_total") == r.usage.completion_tokens == 5
    assert delta("hotcold:time_to_first_token_seconds_count") == 1
    assert delta("hotcold:inter_token_latency_seconds_count") == 4
    assert delta("hotcold:e2e_request_latency_seconds_count") == 1
    assert delta("hotcold:request_success_total{finished_reason=length}") == 1
    assert 0 < after["hotcold:time_to_first_token_seconds_sum"]
    assert 0.0 <= after["hotcold:kv_cache_usage_perc"] <= 1.0
    assert after["hotcold:num_requests_running"] == 0 and after["hotcold:num_requests_waiting"] == 0
    # dense model: the sparsity gauges exist and say "not measured"
    assert math.isnan(after["hotcold:ffn_sparsity"]) and math.isnan(after["hotcold:ffn_hot_share"])


# --------------------------------------------------------------------------------- batch invariance
def _batch_prompts() -> list[str]:
    words = "the a quick brown fox jumps over lazy dog while cat sleeps in sun today".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(2 + 3 * (i % 4))) for i in range(16)]


def test_batch_invariance_16_concurrent(server):
    """Continuous batching must not change results: 16 requests at once (8 run, 8 queue, joining as
    others leave; prefill chunked at 64 tokens) equal the same requests sent one at a time."""
    prompts = _batch_prompts()
    # varied lengths so sequences join and leave the batch at different steps
    bodies = [{"prompt": p * (1 + i % 3), "max_tokens": 8 + 4 * (i % 5), "temperature": 0, "ignore_eos": True}
              for i, p in enumerate(prompts)]
    bodies[3].update(temperature=0.9, seed=11)  # seeded sampling must be batch-invariant too
    bodies[9].update(temperature=0.9, seed=12, top_k=20)

    def text(body: dict) -> str:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [text(b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(text, bodies))
    assert together == alone
