"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` backend.

A GGUF carries no tokenizer.json: only the vocabulary, merges or scores, token types and, for byte-level BPE, the
*name* of the pre-tokenizer its converter recognised (`tokenizer.ggml.pre`). The regexes behind each name are
llama.cpp's (src/llama-vocab.cpp, the LLAMA_VOCAB_PRE_TYPE_* cases), written in the original tokenizer.json
spelling (`(?i:...)` rather than llama.cpp's hand-expanded case classes). Every regex of a name splits the pieces
of the one before, as llama.cpp's unicode_regex_split does; the `tokenizers` equivalent is a Sequence of
Split(..., "isolated"). A name not listed is refused: applying GPT-2's rules to a Llama-3 or Qwen2 vocabulary
runs, but silently produces other ids than the model was trained on.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hotcold.engine.errors import HotcoldError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM's letter class (cased letters). Copies of it that went through NFC normalisation hold lookalikes
# for six code points (U+1F7D, U+1FD3, U+1FDB: range ends that then run backwards; U+1FBE, U+2126, U+212A: the
# last turns "K-ℭ" into a range from ASCII K); those six are written as escapes here.
_DEEPSEEK_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ"
    "\u1f5f-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ\u1fd0-\u1fd3\u1fd6-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)
_DEEPSEEK_LLM = ["[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                 "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"]

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges: a piece that is itself a token is kept whole)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "gpt-2": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "llama-bpe": ([_LLAMA3], True),
    "llama3": ([_LLAMA3], True),
    "llama-v3": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
    "deepseek-r1-qwen": ([_QWEN2], False),
    "tekken": ([_TEKKEN], True),
    # llama.cpp itself does not know "mistral-bpe"; the converters that write it use it for Mistral's
    # tiktoken-style BPE (Nemo and later), which llama.cpp calls "tekken"
    "mistral-bpe": ([_TEKKEN], True),
    "deepseek-llm": (_DEEPSEEK_LLM, False),
}

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def vocabulary(meta: dict[str, Any]) -> list[str]:
    """The GGUF's token list, which every tokenizer model needs (and the model's vocabulary size, where the
    metadata gives none)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise HotcoldError("this GGUF file lacks its vocabulary (tokenizer.ggml.tokens, a list of strings)")
    return tokens


def backend_from_gguf(meta: dict[str, Any]) -> tuple[HFTokenizer, bool]:
    """The backend for a GGUF's tokenizer and whether BOS is added by default (llama.cpp's defaults: yes for
    SentencePiece, no for BPE; `tokenizer.ggml.add_bos_token` overrides either)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend, add_bos = _byte_level_bpe(meta), False
    elif kind == "llama":
        backend, add_bos = _sentencepiece(meta), True
    else:
        raise HotcoldError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, "
                           "llama SentencePiece)")
    _add_special_tokens(backend, meta)
    flag = meta.get("tokenizer.ggml.add_bos_token")
    return backend, add_bos if flag is None else bool(flag)


def _byte_level_bpe(meta: dict[str, Any]) -> HFTokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        what = "has no tokenizer.ggml.pre" if pre is None else f"has pre-tokenizer {pre!r}"
        raise HotcoldError(f"this GGUF's BPE tokenizer {what}, which hotcold does not know: refusing to guess how "
                           f"it splits text (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = vocabulary(meta)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(meta: dict[str, Any]) -> HFTokenizer:
    """Llama-2-style SentencePiece: llama.cpp joins the adjacent pair whose join is the best-scored token, which is
    BPE with every two-piece split of a normal token as a merge, ranked by that token's score; characters outside
    the vocabulary fall back to <0xXX> byte tokens."""
    tokens = vocabulary(meta)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for i, tok in enumerate(tokens):
        if int(types[i]) not in (_NORMAL, _USER_DEFINED):
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], (left, right)))
    merges = [m for *_, m in sorted(ranked)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    scheme = "first" if prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend


def _add_special_tokens(backend: HFTokenizer, meta: dict[str, Any]) -> None:
    """Control tokens (<|im_start|>, <s>) match whole and are skipped when decoding; user-defined ones (<think>)
    match whole too but decode as text, as llama.cpp does with both."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
            if int(t) == _USER_DEFINED]
    backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
