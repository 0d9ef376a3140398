"""The two generation endpoints: /v1/completions and /v1/chat/completions, whole or streamed as SSE
(`data: {json}` chunks sharing one id, finish_reason only on a choice's last chunk, an optional usage
chunk with `choices: []`, then `data: [DONE]`), exactly as OpenAI and vLLM do."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from hotcold.server import protocol as P
from hotcold.server import serving as S
from hotcold.server.async_engine import AsyncEngine, Backend, Group

log = logging.getLogger("hotcold.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Submit = Callable[[list[tuple[str, list[int], Any]]], Awaitable[Group]]


class _SSE(StreamingResponse):
    """An SSE response that aborts its requests however it ends, even if cancelled before the body
    generator ever started (a client that vanished right after sending)."""

    def __init__(self, body: AsyncIterator[str], group: Group | None):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.group is not None:
                self.group.abort()


def _error_chunk(exc: Exception) -> str:
    log.error("generation failed mid-stream: %s", exc)
    err = S.APIError(500, f"generation failed: {exc}", type="server_error", code="internal_error")
    return S.sse(err.envelope())


def _apply(ch: S.Choice, out: Any) -> None:
    ch.text += out.new_text
    ch.num_tokens += len(out.new_token_ids)
    if out.finished:
        ch.finish_reason = out.finish_reason


# ------------------------------------------------------------------------------------- completions
async def serve_completion(req: P.CompletionRequest, request: Request, aengine: AsyncEngine, backend: Backend,
                           model_name: str, submit: Submit, until_disconnect: Callable) -> Any:
    tok = backend.tokenizer
    as_ids = req.return_tokens_as_token_ids
    S.check_token_ids(req, backend.vocab_size)
    prompts = await S.tokenize_prompts(req, tok, backend.vocab_size, aengine.max_model_len)
    max_tokens = [S.resolve_max_tokens(req.max_tokens, len(p.ids), aengine.max_model_len, "max_tokens",
                                       "prompt" if len(prompts) == 1 else f"prompt.{i}")
                  for i, p in enumerate(prompts)]
    want_lp = req.logprobs is not None
    choices = [S.Choice(index=pi * req.n + i, prompt=p) for pi, p in enumerate(prompts) for i in range(req.n)]
    score_prompt = req.echo and want_lp  # the prompt's logprobs come from the request's own prefill
    rid = P.random_id("cmpl")
    by_rid = {f"{rid}-{ch.index}": ch for ch in choices}
    requests = [(f"{rid}-{ch.index}", ch.prompt.ids,
                 S.sampling_params(req, max_tokens[ch.index // req.n], ch.index % req.n, req.logprobs,
                                   backend.generation_defaults, req.logprobs if score_prompt else None))
                for ch in choices if max_tokens[ch.index // req.n] > 0 or score_prompt]
    for ch in choices:
        if max_tokens[ch.index // req.n] == 0 and not score_prompt:  # echo only: nothing to run
            ch.finish_reason = "length"
    group = await submit(requests) if requests else None
    created = P.now()
    prompt_tokens = sum(len(p.ids) for p in prompts)

    def lp_entries(out: Any) -> list[tuple[int, float | None, dict]]:
        return [(x.token_id, x.logprob, x.top) for x in (out.logprobs or [])]

    def start(ch: S.Choice, out: Any | None) -> None:
        """A choice's first output: the echoed prompt, with its logprobs when asked, goes before it."""
        if req.echo and not ch.echoed:
            ch.echoed = True
            if out is not None and out.prompt_logprobs is not None:
                S.add_completion_logprobs(ch, tok, [(t, None if x is None else x.logprob, {} if x is None else x.top)
                                                    for t, x in zip(ch.prompt.ids, out.prompt_logprobs)], as_ids)
            ch.text = ch.prompt.text

    if not req.stream:
        async def collect() -> P.CompletionResponse:
            for ch in choices:
                if ch.finish_reason:
                    start(ch, None)
            if group is not None:
                async for out in group.outputs():
                    ch = by_rid[out.request_id]
                    start(ch, out)
                    if want_lp:
                        S.add_completion_logprobs(ch, tok, lp_entries(out), as_ids)
                    _apply(ch, out)
            return P.CompletionResponse(
                id=rid, created=created, model=model_name,
                choices=[P.CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                            logprobs=S.completion_logprobs_slice(c, 0) if want_lp else None)
                         for c in choices],
                usage=P.usage(prompt_tokens, sum(c.num_tokens for c in choices)))

        return await until_disconnect(request, collect())

    exclude = None if req.include_usage else {"usage"}

    def chunk(ch: S.Choice, text: str, lp_start: int, finish: str | None) -> str:
        lp = S.completion_logprobs_slice(ch, lp_start) if want_lp else None
        return S.sse(P.CompletionChunk(id=rid, created=created, model=model_name, choices=[
            P.CompletionChoice(index=ch.index, text=text, logprobs=lp, finish_reason=finish)]), exclude)

    async def events() -> AsyncIterator[str]:
        try:
            for ch in choices:
                if ch.finish_reason:  # echo only
                    start(ch, None)
                    yield chunk(ch, ch.text, 0, ch.finish_reason)
            if group is not None:
                async for out in group.outputs():
                    ch = by_rid[out.request_id]
                    first, echo = len(ch.tokens), ""
                    if req.echo and not ch.echoed:
                        start(ch, out)
                        first, echo = 0, ch.text
                    if want_lp:
                        S.add_completion_logprobs(ch, tok, lp_entries(out), as_ids)
                    _apply(ch, out)
                    if echo or out.new_text or out.finished or len(ch.tokens) > first:
                        yield chunk(ch, echo + out.new_text, first, out.finish_reason if out.finished else None)
            if req.include_usage:
                yield S.sse(P.CompletionChunk(id=rid, created=created, model=model_name, choices=[],
                                              usage=P.usage(prompt_tokens, sum(c.num_tokens for c in choices))))
            yield S.SSE_DONE
        except Exception as exc:  # an engine failure after the headers went out: say so in-band
            yield _error_chunk(exc)
            yield S.SSE_DONE
        finally:
            if group is not None:
                group.abort()

    return _SSE(events(), group)


# -------------------------------------------------------------------------------------------- chat
async def serve_chat(req: P.ChatCompletionRequest, request: Request, aengine: AsyncEngine, backend: Backend,
                     model_name: str, submit: Submit, until_disconnect: Callable) -> Any:
    tok = backend.tokenizer
    as_ids = req.return_tokens_as_token_ids
    S.check_token_ids(req, backend.vocab_size)
    prompt = await S.tokenize_chat(req.messages, req.add_generation_prompt, tok, aengine.max_model_len)
    max_tokens = S.resolve_max_tokens(req.max_new_tokens(), len(prompt.ids), aengine.max_model_len,
                                      "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens",
                                      "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    rid = P.random_id("chatcmpl")
    choices = [S.Choice(index=i, prompt=prompt) for i in range(req.n)]
    by_rid = {f"{rid}-{ch.index}": ch for ch in choices}
    group = await submit([(f"{rid}-{ch.index}", prompt.ids,
                           S.sampling_params(req, max_tokens, ch.index, k, backend.generation_defaults))
                          for ch in choices])
    created = P.now()
    lps: dict[int, list[P.ChatTokenLogprob]] = {ch.index: [] for ch in choices}

    if not req.stream:
        async def collect() -> P.ChatCompletionResponse:
            async for out in group.outputs():
                ch = by_rid[out.request_id]
                _apply(ch, out)
                if k is not None:
                    lps[ch.index] += S.chat_logprobs(tok, out.logprobs or [], as_ids)
            return P.ChatCompletionResponse(
                id=rid, created=created, model=model_name,
                choices=[P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text),
                                      finish_reason=c.finish_reason,
                                      logprobs=P.ChatLogprobs(content=lps[c.index]) if k is not None else None)
                         for c in choices],
                usage=P.usage(len(prompt.ids), sum(c.num_tokens for c in choices)))

        return await until_disconnect(request, collect())

    exclude = None if req.include_usage else {"usage"}

    def chunk(ch: S.Choice, delta: P.Delta, lp: list[P.ChatTokenLogprob] | None, finish: str | None) -> str:
        return S.sse(P.ChatCompletionChunk(id=rid, created=created, model=model_name, choices=[
            P.ChatChunkChoice(index=ch.index, delta=delta, finish_reason=finish,
                              logprobs=None if lp is None else P.ChatLogprobs(content=lp))]), exclude)

    async def events() -> AsyncIterator[str]:
        try:
            for ch in choices:
                yield chunk(ch, P.Delta(role="assistant", content=""), None, None)
            async for out in group.outputs():
                ch = by_rid[out.request_id]
                _apply(ch, out)
                lp = S.chat_logprobs(tok, out.logprobs or [], as_ids) if k is not None else None
                if out.new_text or out.finished or lp:
                    yield chunk(ch, P.Delta(content=out.new_text or None), lp,
                                out.finish_reason if out.finished else None)
            if req.include_usage:
                yield S.sse(P.ChatCompletionChunk(id=rid, created=created, model=model_name, choices=[],
                                                  usage=P.usage(len(prompt.ids),
                                                                sum(c.num_tokens for c in choices))))
            yield S.SSE_DONE
        except Exception as exc:
            yield _error_chunk(exc)
            yield S.SSE_DONE
        finally:
            group.abort()

    return _SSE(events(), group)
