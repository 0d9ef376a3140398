"""A multi-turn chat workload for serve_load.py: C conversations at once, each T turns, each turn resending
the whole history (system prompt, earlier questions and answers) as chat clients do, so that a server with a
prefix cache computes only the new turn. Every run makes fresh system prompts and questions from its seed:
nothing a server has cached from an earlier run matches."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx

WORDS = ("river stone market garden lamp window harbor engine paper winter orange signal forest bridge "
         "letter candle mirror silver planet thunder violin castle pepper rocket saddle").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def _turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed turn; a connection the server closed before answering (a kept-alive socket it timed out
    as the request went out) is retried, at most twice, and counted."""
    for attempt in range(3):
        try:
            return {**await _turn_once(client, url, model, messages, max_tokens), "retries": attempt}
        except httpx.RemoteProtocolError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _turn_once(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    # ignore_eos (hotcold, vLLM and llama-server all take it): every answer is max_tokens long on every server
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, text, chunks = None, "", 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            piece = choices[0].get("delta", {}).get("content") if choices else None
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += piece
                chunks += 1
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "text": text, "chunks": chunks,
            "seconds": time.perf_counter() - t0}


async def _conversation(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, turns: int,
                        system_words: int, question_words: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a terse assistant. Context: " + _sentence(rng, system_words)}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1}: " + _sentence(rng, question_words) + "?"})
        r = await _turn(client, url, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        out.append({"turn": t + 1, **r})
    return out


async def _run(url: str, model: str, seed: int, conversations: int, turns: int, system_words: int,
               question_words: int, max_tokens: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            _conversation(client, url, model, random.Random(seed * 1000 + c), turns, system_words, question_words,
                          max_tokens) for c in range(conversations)))
        return [r for conv in results for r in conv], time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def chat_load(url: str, model: str, seed: int, conversations: int = 4, turns: int = 4, system_words: int = 400,
              question_words: int = 30, max_tokens: int = 48) -> dict:
    """Run the workload once; TTFT of first turns and of later ones (ms), output chunks per second."""
    records, duration = asyncio.run(_run(url, model, seed, conversations, turns, system_words, question_words,
                                         max_tokens))
    first = [r["ttft"] * 1e3 for r in records if r["turn"] == 1]
    later = [r["ttft"] * 1e3 for r in records if r["turn"] > 1]
    return {"requests": len(records), "retries": sum(r["retries"] for r in records), "duration_s": duration,
            "output_throughput": sum(r["chunks"] for r in records) / duration,
            "ttft_first_turn_ms": {"median": statistics.median(first), "p99": _pct(first, 0.99)},
            "ttft_later_turns_ms": {"median": statistics.median(later), "p99": _pct(later, 0.99)}}
