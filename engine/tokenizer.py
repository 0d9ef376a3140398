"""Tokenizers from a Hugging Face folder (tokenizer.json) or from GGUF metadata, plus chat templates."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from hotcold.engine.errors import HotcoldError


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others are
    shifted past 255 (as `ByteLevel` pre-tokenizers write vocabularies)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


_TEMPLATE_RANGE_STEPS = 10**6  # a chat template's range() loops, all together (a template is model input)


def _bounded_range(steps: int):
    """range() for one render, failing once its loops ask for more than `steps` values in all: the sandbox
    caps one range at 10^5, but two nested ones ran for minutes and held a server's request."""
    left = [steps]

    def bounded(*args: int) -> range:
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise HotcoldError(f"chat template: its loops ask for more than {steps} steps")
        return r

    return bounded


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode text and render chat prompts, the way transformers' tokenizers do."""

    def __init__(self, backend: HFTokenizer, bos_token: str | None, eos_tokens: list[str],
                 chat_template: str | None, add_bos: bool, extra_eos_ids: list[int] | None = None):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        ids = {backend.token_to_id(t) for t in eos_tokens} | set(extra_eos_ids or [])
        self.eos_token_ids: set[int] = {i for i in ids if i is not None}
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: it lets go of the GIL, so a server's other streams run while a long prompt is
        # encoded (encode held it: 1.6 s for 600k characters, every stream and /health stalled)
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string: a byte, a ▁, <0xNN> or a character
        each), so a text longer than n times this cannot encode to n tokens or fewer."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def _byte_level(self) -> dict[str, int] | None:
        return _byte_level_chars() if type(self.backend.decoder).__name__ == "ByteLevel" else None

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to decoded text (none for a special token, which decoding skips): a
        character split over several tokens shows as its real bytes in each, where decoding the token alone
        gives U+FFFD (what OpenAI's logprobs `bytes` are for)."""
        if token_id in self._special_ids:
            return b""
        piece = self.id_to_token(token_id)
        table = self._byte_level
        if table is not None and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if m := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]  # the GIL: as encode

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(int(token_id)) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render with the model's own jinja2 template in a sandbox, as transformers does."""
        if not self.chat_template:
            raise HotcoldError("this model has no chat template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise HotcoldError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["range"] = _bounded_range(_TEMPLATE_RANGE_STEPS)
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TemplateError as exc:
            raise HotcoldError(f"chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def from_hf_folder(folder: Path, generation_eos: list[int] | None = None) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise HotcoldError(f"{folder}: no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:
        raise HotcoldError(f"{path}: cannot read tokenizer ({exc})") from None
    cfg_path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    except ValueError as exc:
        raise HotcoldError(f"{cfg_path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise HotcoldError(f"{cfg_path}: expected a JSON object, found {type(cfg).__name__}")
    template = cfg.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if template is None and template_file.exists():
        template = template_file.read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos = _token_text(cfg.get("eos_token"))
    return Tokenizer(backend, _token_text(cfg.get("bos_token")), [eos] if eos else [], template,
                     add_bos=bool(cfg.get("add_bos_token", False)), extra_eos_ids=generation_eos)


def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer stored in a GGUF's metadata (engine.gguf_tokenizer rebuilds its backend)."""
    from hotcold.engine.gguf_tokenizer import backend_from_gguf

    backend, add_bos = backend_from_gguf(meta)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def token(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    eos = token("tokenizer.ggml.eos_token_id")
    return Tokenizer(backend, token("tokenizer.ggml.bos_token_id"), [eos] if eos else [],
                     meta.get("tokenizer.chat_template"), add_bos=add_bos)


def load_tokenizer(spec: str | Path = "default") -> Tokenizer:
    """The tokenizer of a model (default, HF folder or .gguf file) without loading its weights."""
    from hotcold.engine.gguf_weights import GGUFReader
    from hotcold.engine.loader import resolve_model_path

    path = resolve_model_path(spec)
    if path.suffix == ".gguf":
        return from_gguf_metadata(GGUFReader(path).metadata)
    gen = path / "generation_config.json"
    eos = []
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        eos = value if isinstance(value, list) else ([value] if value is not None else [])
    return from_hf_folder(path, eos)
