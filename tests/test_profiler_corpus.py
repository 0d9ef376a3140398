"""The calibration corpus: built-in (deterministic, held-out part disjoint) and user files (text, JSONL)."""

from __future__ import annotations

import json

import pytest

from hotcold.engine.errors import HotcoldError
from hotcold.profiler.corpus import (
    CALIBRATION_MODULES,
    EVALUATION_MODULES,
    build_corpus,
    builtin_texts,
    read_texts,
)


class CharTokenizer:
    """One token per character: lengths are easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_builtin_corpus_is_deterministic_and_disjoint():
    assert not set(CALIBRATION_MODULES) & set(EVALUATION_MODULES)
    calib, evals = builtin_texts()
    assert (calib, evals) == builtin_texts()
    assert sum(map(len, calib)) > 300_000 and sum(map(len, evals)) > 40_000  # ~50k tokens with room
    assert calib[0].startswith("argparse\n")
    assert not set(calib) & set(evals)


def test_builtin_budget():
    c = build_corpus(CharTokenizer(), None, calibration_tokens=5000, evaluation_tokens=700)
    assert len(c.calibration) == 5000 and len(c.evaluation) == 700
    seqs = c.sequences(256)
    assert sum(map(len, seqs)) == 5000 and len(seqs) == 20  # 19 full sequences and a tail of 136
    assert all(len(s) <= 256 for s in seqs)


def test_user_files_text_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("x" * 1000)
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "y" * 500}) + "\n\n" + json.dumps({"text": "z" * 500, "id": 3}) + "\n")
    assert read_texts([txt, jl]) == ["x" * 1000, "y" * 500, "z" * 500]
    c = build_corpus(CharTokenizer(), [txt, jl], calibration_tokens=10_000, evaluation_tokens=300)
    stream = [ord(ch) for ch in "x" * 1000 + "\n\n" + "y" * 500 + "\n\n" + "z" * 500 + "\n\n"]
    assert c.evaluation == stream[-300:]  # the end is held out
    assert c.calibration == stream[:-300]  # and never calibrated on
    small = build_corpus(CharTokenizer(), [txt, jl], calibration_tokens=10_000, evaluation_tokens=5000)
    assert len(small.evaluation) == len(stream) // 5  # at most a fifth is held out


def test_bad_user_files(tmp_path):
    with pytest.raises(HotcoldError, match="no such file"):
        read_texts([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(HotcoldError, match=r"bad.jsonl:2"):
        read_texts([bad])
    bad.write_text("{broken\n")
    with pytest.raises(HotcoldError, match="invalid JSON"):
        read_texts([bad])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HotcoldError, match="UTF-8"):
        read_texts([binary])
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(HotcoldError, match="calibration tokens"):
        build_corpus(CharTokenizer(), [short], 1000, 100)
