"""From a validated request to engine requests and back: tokenize, check the context, build SamplingParams
per choice, and turn RequestOutputs into OpenAI completion / chat objects (whole or as SSE chunks)."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hotcold.engine.errors import HotcoldError
from hotcold.server import protocol as P


class APIError(Exception):
    """An error the client caused (or may retry), rendered as OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def envelope(self) -> dict:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns


@dataclass
class Choice:
    """One choice being accumulated: its text, token count, logprobs and finish reason."""

    index: int
    prompt: Prompt
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    chars: int = 0  # characters of text the logprobs' tokens have completed so far (text_offset's clock)
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    echoed: bool = False  # the prompt (echo) is in text and logprobs


# ----------------------------------------------------------------------------------------- requests
def _too_long(max_model_len: int, what: str, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the {what}.",
                    param=param, code="context_length_exceeded")


def check_text_fits(text_chars: int, tokenizer: Any, max_model_len: int, param: str) -> None:
    """Refuse, before encoding it, a text that no tokenization could fit in the context: one token stands
    for at most `max_token_chars` characters. Encoding megabytes only to refuse them costs seconds of CPU
    and memory that the server keeps (a 50 MB prompt took 87 s)."""
    if text_chars > max_model_len * tokenizer.max_token_chars:
        what = "messages have" if param == "messages" else "prompt has"
        raise _too_long(max_model_len, f"{what} {text_chars} characters, more than {max_model_len} tokens "
                                       f"can hold", param)


async def tokenize_prompts(req: P.CompletionRequest, tokenizer: Any, vocab_size: int,
                           max_model_len: int) -> list[Prompt]:
    prompts = []
    for i, p in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            check_text_fits(len(p), tokenizer, max_model_len, param)
            ids = await asyncio.to_thread(tokenizer.encode, p)
            text = p
        else:
            if len(p) >= max_model_len:
                raise _too_long(max_model_len, f"prompt has {len(p)} tokens", param)
            bad = [t for t in p if t >= vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {vocab_size})",
                               param=param)
            ids = list(p)
            text = await asyncio.to_thread(tokenizer.decode, ids)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        prompts.append(Prompt(ids, text))
    return prompts


async def tokenize_chat(chat: list[P.ChatMessage], add_generation_prompt: bool, tokenizer: Any, max_model_len: int,
                        add_special_tokens: bool = False) -> Prompt:
    """The messages through the model's chat template, then encoded (by default without BOS: the template
    writes it when the model wants one)."""
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in chat]
    if len(messages) > max_model_len:  # a template writes at least a token per message
        raise _too_long(max_model_len, f"request has {len(messages)} messages", "messages")
    check_text_fits(sum(len(m["content"]) for m in messages), tokenizer, max_model_len, "messages")
    try:
        text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt)
    except HotcoldError as exc:
        raise APIError(400, str(exc), param="messages") from None
    check_text_fits(len(text), tokenizer, max_model_len, "messages")
    ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
    if not ids:
        raise APIError(400, "the rendered chat prompt is empty", param="messages")
    return Prompt(ids, text)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str,
                       prompt_param: str) -> int:
    """None fills the context (vLLM); an explicit value that does not fit is the client's error (400), named
    as the prompt's when the prompt alone fills the context."""
    if prompt_len >= max_model_len:
        raise _too_long(max_model_len, f"prompt has {prompt_len} tokens", prompt_param)
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                       param=param, code="context_length_exceeded")
    return requested


def sampling_params(req: P.SamplingFields, max_tokens: int, choice: int, logprobs: int | None,
                    defaults: Any = None, prompt_logprobs: int | None = None) -> Any:
    """SamplingParams for one choice: unset fields fall back to the model's generation_config, then to
    OpenAI's defaults; choice i of a seeded request gets seed + i so that n > 1 gives n different samples."""
    from hotcold.engine.sampling import SamplingParams

    def pick(value: Any, name: str, fallback: Any) -> Any:
        if value is not None:
            return value
        d = getattr(defaults, name, None) if defaults is not None else None
        return fallback if d is None else d

    top_k = pick(req.top_k, "top_k", 0)
    seed = None if req.seed is None else (req.seed + choice) % (2**64)
    return SamplingParams(
        max_tokens=max_tokens, temperature=pick(req.temperature, "temperature", 1.0),
        top_p=pick(req.top_p, "top_p", 1.0), top_k=max(0, top_k), min_p=req.min_p or 0.0, seed=seed,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0), stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=req.bias())


def check_token_ids(req: P.SamplingFields, vocab_size: int) -> None:
    """logit_bias keys and stop_token_ids name tokens of this vocabulary."""
    for param, ids in (("logit_bias", req.bias()), ("stop_token_ids", req.stop_token_ids or [])):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is out of range (vocabulary size {vocab_size})",
                           param=param)


# ---------------------------------------------------------------------------------------- responses
def token_text(tokenizer: Any, token_id: int, as_id: bool) -> str:
    """A token as logprobs show it: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id])


def add_completion_logprobs(ch: Choice, tokenizer: Any, entries: list[tuple[int, float | None, dict]],
                            as_ids: bool = False) -> None:
    """Append (token_id, logprob, top {id: lp}) entries in the completions format, before the entries'
    text is added to ch.text; the chosen token is always among top_logprobs, as vLLM does. A token's
    text_offset counts the characters its predecessors' bytes complete: the tokens of one character split
    over several all point at that character."""
    if not ch.text_offset:
        ch.chars = len(ch.text)
    for tid, lp, top in entries:
        tok = token_text(tokenizer, tid, as_ids)
        ch.tokens.append(tok)
        ch.token_logprobs.append(lp)
        if lp is None:
            ch.top_logprobs.append(None)
        else:
            d = {token_text(tokenizer, i, as_ids): v for i, v in top.items()}
            d.setdefault(tok, lp)
            ch.top_logprobs.append(d)
        ch.text_offset.append(ch.chars)
        ch.chars += len(ch.utf8.decode(tokenizer.token_bytes(tid)))


def completion_logprobs_slice(ch: Choice, start: int) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(tokens=ch.tokens[start:], token_logprobs=ch.token_logprobs[start:],
                                top_logprobs=ch.top_logprobs[start:], text_offset=ch.text_offset[start:])


def chat_logprobs(tokenizer: Any, out_logprobs: list[Any], as_ids: bool = False) -> list[P.ChatTokenLogprob]:
    entries = []
    for tl in out_logprobs:
        tok = token_text(tokenizer, tl.token_id, as_ids)
        tops = [P.TopLogprob(token=token_text(tokenizer, i, as_ids), logprob=v, bytes=list(tokenizer.token_bytes(i)))
                for i, v in sorted(tl.top.items(), key=lambda kv: -kv[1])]
        entries.append(P.ChatTokenLogprob(token=tok, logprob=tl.logprob, bytes=list(tokenizer.token_bytes(tl.token_id)),
                                          top_logprobs=tops))
    return entries


def sse(obj: P.BaseModel | dict, exclude: set[str] | None = None) -> str:
    if isinstance(obj, dict):
        return f"data: {json.dumps(obj)}\n\n"
    return f"data: {obj.model_dump_json(exclude=exclude)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def aclose_quietly(agen: AsyncIterator[Any]) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        await close()
