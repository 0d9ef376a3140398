"""The server's answers to bad requests: every one an OpenAI error object with the right status and `param`,
context overflows coded `context_length_exceeded`, and the server answering normally after each."""

from __future__ import annotations

import pytest
from live_server import api_test_server, post


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    yield from api_test_server(tmp_path_factory.mktemp("srv"))


LONG_IDS = [5] * 4000
BAD_REQUESTS = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),  # 64 at most
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [320]}, 400, "stop_token_ids"),  # vocabulary: 320
    ("/v1/completions", {"prompt": "x", "logit_bias": {"²": 1}}, 400, "logit_bias"),  # "²".isdigit()
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1, "320": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0.001}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", "", 400, None),
    ("/v1/completions", {"prompt": [1, -5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 9, "max_tokens": 1}, 400, "n"),  # 18 > 16 sequences
    ("/v1/completions", {"prompt": ["x"] * 17, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG_IDS, "max_tokens": 200}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG_IDS + [5] * 200}, 400, "prompt"),  # the prompt alone: 4200 > 4096
    ("/v1/completions", {"prompt": [5] * 10**6}, 400, "prompt"),
    # refused before it is encoded: more characters than 4096 tokens can hold
    ("/v1/completions", {"prompt": "hello world " * 10**5, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 5000}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 10**5}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400,
     "max_tokens"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_input_gets_openai_error(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if isinstance(body, dict) and (len(body.get("prompt", "")) >= 4000 or body.get("max_tokens") == 5000
                                   or len(body.get("messages", [])) >= 4000):
        assert err["code"] == "context_length_exceeded"
    if isinstance(body, dict) and isinstance(body.get("prompt"), str) and len(body["prompt"]) > 10**5:
        assert "characters" in err["message"], err  # refused from its length, before encoding
    # the server keeps answering
    ok = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200
