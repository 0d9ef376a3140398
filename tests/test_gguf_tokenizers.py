"""GGUF tokenizers against transformers: every supported `tokenizer.ggml.pre` and SentencePiece GGUFs.

Each case trains a small BPE with `tokenizers`, laid out as that model family's own tokenizer.json is (its
pre-tokenizer, ignore_merges), writes it into a GGUF with gguf-py the way llama.cpp's converter does, and compares
hotcold's ids on a multilingual, code and digit-heavy text with two references from transformers:
- its GGUF conversion, `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, where it knows the name (gpt-2,
  llama-bpe, qwen2, tekken; for mistral-bpe, which it does not know, the same file renamed to tekken);
- the original tokenizer (PreTrainedTokenizerFast over the trained tokenizer) for every name, since transformers'
  GGUF conversion falls back to GPT-2 splitting for smollm and deepseek-llm.
The pre-tokenizers of the originals come from transformers' own regex constants where it has them, from
`Digits`/`ByteLevel` for smollm and GPT-2, and from DeepSeek's tokenizer.json layout for deepseek-llm.
"""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from hotcold.engine.errors import HotcoldError
from hotcold.engine.gguf_weights import GGUFReader
from hotcold.engine.tokenizer import from_gguf_metadata

TEXT = (
    "Hello world! Numbers 1234567 and 3.14159, 2024-11-30; x=f(y)+42\n\tdef foo(bar):\n        return bar**2  # ok\n"
    "Ünïcödé café naïve — Ελληνικά Κείμενο, Русский текст, 日本語のテキスト, 中文字符, "
    "한국어 텍스트, العربية, हिन्दी.\n\n"
    "I'm, you're, HE'LL, they've, we'd  ...   $100.00 !!! ??? 🙂🚀 ÀÉÎÕÜ µ ΩK ℭ ١٢٣ ５６ "
    "CamelCaseWord getHTTPResponse\r\n"
    "<|im_start|>user\n12 + 345 = 357<|im_end|>"
)
CORPUS = [
    "The year 2024 had 366 days; 1,234,567 people counted 3.14159 and 2.71828 again and again.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # 0 1 1 2 3 5 8 13\n",
    "Ελληνικά κείμενα και Русский текст и 日本語のテキストと中文字符和한국어 텍스트 في العربية और हिन्दी में।",
    "I'm sure you're right, they'll say we'd've known; HE'S HERE. CamelCaseWords and getHTTPResponse() calls.",
    "Prices: $100.00, €250, ¥3000 — call 555-0123 or 555-9876 before 10:30.\r\n\tTabs\tand  spaces   too.",
    "{\"key\": [1, 22, 333, 4444], \"nested\": {\"a\": true}} <div class=\"x\">café naïve Ünïcödé</div>",
] * 8
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_DEEPSEEK_CLASS = (  # DeepSeek LLM's tokenizer.json letter class, as llama.cpp lists it (ranges de-normalised)
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ"
    "\u1f5f-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ\u1fd0-\u1fd3\u1fd6-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)


def _split_then_bytes(*regexes: str) -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _original(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool, normalizers.Normalizer | None]:
    """The family's own tokenizer.json: pre-tokenizer, ignore_merges, normalizer."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return byte_level, False, None
    if pre == "smollm":  # SmolLM2: digits one by one, then GPT-2's byte-level regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False, None
    if pre == "llama-bpe":
        return _split_then_bytes(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), True, None
    if pre == "qwen2":
        return _split_then_bytes(GGUF_PRE_TOKENIZER_SPLITS["qwen2"]), False, normalizers.NFC()
    if pre == "mistral-bpe":  # Mistral's tiktoken-style BPE, which llama.cpp and transformers call tekken
        return _split_then_bytes(GGUF_PRE_TOKENIZER_SPLITS["tekken"]), True, None
    if pre == "deepseek-llm":
        splits = ["[\r\n]", rf"\s?[{_DEEPSEEK_CLASS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", "[一-龥ࠀ-一가-퟿]+"]
        seq = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        seq += [pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        return pre_tokenizers.Sequence(seq), False, None
    raise KeyError(pre)


def _train(pre: str) -> Tokenizer:
    pre_tokenizer, ignore_merges, normalizer = _original(pre)
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _write_gguf(path, tokens: list[str], types: list[int], pre: str | None, merges: list[str] | None = None,
                model: str = "gpt2", scores: list[float] | None = None, add_bos: bool | None = None) -> None:
    """A vocab-only GGUF with llama.cpp's tokenizer keys, as convert_hf_to_gguf.py writes them."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _bpe_gguf(tmp_path, tok: Tokenizer, pre: str | None, name: str = "tok.gguf"):
    vocab, merges = _vocab_and_merges(tok)
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    folder = tmp_path / (pre or "none")
    folder.mkdir(parents=True, exist_ok=True)
    _write_gguf(folder / name, tokens, types, pre, [" ".join(m) for m in merges])
    return folder / name


def _vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = json.loads(tok.to_str())["model"]
    return dict(spec["vocab"]), [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]


def _with_layout(tok: Tokenizer, pre: str, extra: list[str] = ()) -> PreTrainedTokenizerFast:
    """The vocabulary and merges of `tok` (plus `extra` tokens without merges) under family `pre`'s own
    tokenizer.json layout, in transformers."""
    pre_tokenizer, ignore_merges, normalizer = _original(pre)
    vocab, merges = _vocab_and_merges(tok)
    for token in extra:
        vocab[token] = len(vocab)
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    out.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        out.normalizer = normalizer
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=out)


def _ours(path):
    return from_gguf_metadata(GGUFReader(path).metadata)


CASES = ["gpt-2", "smollm", "llama-bpe", "qwen2", "mistral-bpe", "deepseek-llm"]


@pytest.mark.parametrize("trained_as", ["own", "gpt-2"])
@pytest.mark.parametrize("pre", CASES)
def test_pre_tokenizer_ids_match_transformers(pre, trained_as, tmp_path):
    """`own`: a vocabulary trained under the family's layout (as real files are); `gpt-2`: one trained under
    GPT-2's, whose multi-digit and space-digit merges tell the families apart."""
    trained = _train(pre if trained_as == "own" else "gpt-2")
    path = _bpe_gguf(tmp_path, trained, pre)
    ours = _ours(path)
    ids = ours.encode(TEXT, add_special_tokens=False)

    assert ids == _with_layout(trained, pre)(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == TEXT

    known = {"mistral-bpe": "tekken"}.get(pre, pre)
    if known in GGUF_PRE_TOKENIZER_SPLITS or known == "gpt-2":
        renamed = _bpe_gguf(tmp_path / "renamed", trained, known) if known != pre else path
        converted = AutoTokenizer.from_pretrained(str(renamed.parent), gguf_file=renamed.name)
        assert ids == converted(TEXT, add_special_tokens=False)["input_ids"]

    if trained_as == "gpt-2" and pre != "gpt-2":  # the text tells this family from GPT-2 (what hotcold used to do)
        gpt2 = _ours(_bpe_gguf(tmp_path / "as_gpt2", trained, "gpt-2"))
        assert gpt2.encode(TEXT, add_special_tokens=False) != ids


@pytest.mark.parametrize("pre", ["llama-bpe", "mistral-bpe"])
def test_ignore_merges_keeps_whole_vocabulary_words(pre, tmp_path):
    """Llama-3 and Tekken vocabularies hold words their merges never build (tiktoken conversions): llama.cpp and
    the original tokenizer.json (ignore_merges) take such a piece whole. transformers' GGUF conversion does not
    set ignore_merges, so the reference here is the original layout alone."""
    trained = _train(pre)
    vocab, _ = _vocab_and_merges(trained)
    pieces = [p for p, _ in _original(pre)[0].pre_tokenize_str(TEXT)]
    extra = sorted({p for p in pieces if len(p) >= 5 and p not in vocab})
    assert extra
    tokens = sorted(vocab, key=vocab.get) + extra
    path = tmp_path / "whole.gguf"
    _write_gguf(path, tokens, [3 if t in SPECIALS else 1 for t in tokens], pre,
                [" ".join(m) for m in _vocab_and_merges(trained)[1]])
    ids = _ours(path).encode(TEXT, add_special_tokens=False)
    assert ids == _with_layout(trained, pre, extra)(TEXT, add_special_tokens=False)["input_ids"]
    assert set(ids) & set(range(len(vocab), len(tokens)))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "tekken"])
def test_real_vocabulary_matches_transformers_gguf_conversion(pre, default_model_path, tmp_path):
    """SmolLM2's 49k-token vocabulary and merges under each pre-tokenizer transformers converts itself."""
    meta = GGUFReader(default_model_path).metadata
    path = tmp_path / f"{pre}.gguf"
    _write_gguf(path, list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"]), pre,
                list(meta["tokenizer.ggml.merges"]))
    converted = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert _ours(path).encode(TEXT) == converted(TEXT)["input_ids"]


def test_default_model_smollm_matches_its_original_layout(default_model_path):
    """The default model's own GGUF (pre smollm) against SmolLM2's tokenizer.json layout over its vocabulary."""
    meta = GGUFReader(default_model_path).metadata
    assert meta["tokenizer.ggml.pre"] == "smollm"
    tokens = list(meta["tokenizer.ggml.tokens"])
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
    tok.pre_tokenizer = _original("smollm")[0]
    tok.add_special_tokens([t for t, k in zip(tokens, meta["tokenizer.ggml.token_type"]) if int(k) == 3])
    ids = _ours(default_model_path).encode(TEXT)
    assert ids == tok.encode(TEXT).ids
    tok.pre_tokenizer = _original("gpt-2")[0]  # what hotcold applied before: other ids on this text
    assert ids != tok.encode(TEXT).ids


@pytest.mark.parametrize("pre", ["falcon-h1-unknown", "default", None])
def test_unknown_or_missing_pre_tokenizer_is_refused(pre, tmp_path):
    path = _bpe_gguf(tmp_path, _train("gpt-2"), pre)
    with pytest.raises(HotcoldError) as excinfo:
        _ours(path)
    message = str(excinfo.value)
    assert "\n" not in message and "refusing to guess" in message
    assert (repr(pre) if pre else "no tokenizer.ggml.pre") in message


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A Llama-2-shaped SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces scored by merge
    order (a SentencePiece BPE model's scores), trained with tokenizers' Metaspace BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False, special_tokens=[])
    tok.train_from_iterator(CORPUS[:6], trainer=trainer)
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    _write_gguf(path, tokens, types, None, model="llama", scores=scores)
    converted = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = _ours(path)
    text = TEXT.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    ids = ours.encode(text)
    assert ids[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    assert ids == converted(text)["input_ids"]
    assert any(tokens[i].startswith("<0x") for i in ids)  # characters outside the vocabulary became bytes
    assert ours.decode(ids) == converted.decode(ids, skip_special_tokens=True)


def test_sentencepiece_add_bos_flag_is_honoured(tmp_path):
    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    _write_gguf(path, tokens, types, None, model="llama", scores=scores, add_bos=False)
    converted = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert _ours(path).encode("Hello world 123") == converted("Hello world 123")["input_ids"]
    assert _ours(path).encode("Hello world 123")[0] != 1


def test_token_bytes_rebuild_the_text(default_model_path, tmp_path):
    """Each token's bytes (logprobs' `bytes`), joined, are the text's UTF-8 bytes, also where one character
    (an emoji, a CJK character) is split over several tokens and a token alone decodes to U+FFFD: byte-level
    BPE (the default model) and SentencePiece with byte fallback (its <0xNN> tokens, its ▁ for a space)."""
    text = "Grüße aus Köln! 東京は晴れ 🙂🦀 naïve"
    ours = _ours(default_model_path)
    ids = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(ours.token_bytes(i) for i in ids) == text.encode()
    assert ours.token_bytes(ours.encode("<|im_start|>", add_special_tokens=False)[0]) == b""  # skipped in text
    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    _write_gguf(path, tokens, types, None, model="llama", scores=scores)
    spm = _ours(path)
    ids = spm.encode(text, add_special_tokens=False)
    assert any(tokens[i].startswith("<0x") for i in ids)
    assert b"".join(spm.token_bytes(i) for i in ids) == (" " + text).encode()  # SentencePiece's leading ▁


def test_encoding_a_long_text_lets_other_threads_run(default_model_path):
    """A server encodes prompts on a worker thread: encoding must release the GIL, or one long prompt stalls
    every stream and /health for its whole encoding (tokenizers' `encode` holds it, `encode_batch` does not)."""
    import threading
    import time

    ours = _ours(default_model_path)
    text = "".join(chr(0x1F600 + i % 80) for i in range(150_000))  # emoji: several tokens each, ~0.4 s to encode
    reference = ours.backend.encode(text, add_special_tokens=False).ids
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(ids=ours.encode(text, add_special_tokens=False)))
    start = last = time.perf_counter()
    worst = 0.0
    worker.start()
    while worker.is_alive():
        time.sleep(0.005)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    total = time.perf_counter() - start
    assert result["ids"] == reference  # the same tokens as the plain call
    assert worst < total / 2, f"this thread stalled {worst:.2f}s of a {total:.2f}s encoding"
