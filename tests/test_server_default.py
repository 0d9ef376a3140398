"""`hotcold serve` with the default model (SmolLM2-135M-Instruct GGUF) as a real process: the answers a
real model must give, its GGUF chat template, streaming equal to non-streaming, and batch invariance."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from live_server import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(default_model_path):
    srv = ServerProcess("--model", "default", "--served-model-name", "smollm2", "--max-model-len", "512",
                        "--max-num-seqs", "16", "--max-queue", "0")
    srv.wait_ready()
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert srv.stop() == 0, srv.output()
    assert "Traceback" not in srv.output()


def test_greedy_completion_and_stream_agree(client):
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    r = client.completions.create(**kw)
    assert r.choices[0].text.startswith(" Paris")  # what transformers and llama.cpp give (shared/README)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == r.choices[0].text
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 5 + r.usage.completion_tokens


def test_chat_uses_the_gguf_template(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
              max_tokens=12, temperature=0)
    r = client.chat.completions.create(**kw)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_batch_invariance_16_concurrent(client):
    subjects = ["France", "Italy", "Spain", "Japan", "Egypt", "Peru", "Kenya", "Canada", "Chile", "India",
                "Norway", "Greece", "Brazil", "Mexico", "Poland", "Turkey"]
    prompts = [f"Q: What is the capital of {s}?\nA:" + " Let me think." * (i % 3) for i, s in enumerate(subjects)]

    def text(p: str) -> str:
        r = client.completions.create(model="smollm2", prompt=p, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    alone = [text(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(text, prompts))
    assert together == alone
