"""The calibration corpus: the user's files, or English documentation that ships with Python itself.

The built-in corpus is the docstrings of a fixed list of standard-library modules (PSF licence, present on
every machine that runs hotcold, no network): one list for calibration and a disjoint list held out for
evaluation, each read in a fixed order, so the same interpreter always yields the same text.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from hotcold.engine.errors import HotcoldError

CALIBRATION_MODULES = (
    "argparse", "ast", "base64", "bdb", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum",
    "fractions", "ftplib", "functools", "heapq", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "pprint", "queue",
    "random", "re", "sched", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "traceback", "typing",
    "unittest.case", "urllib.parse", "uuid", "warnings", "zipfile",
)
EVALUATION_MODULES = (
    "optparse", "os", "http.client", "http.cookiejar", "tokenize", "selectors", "gettext", "webbrowser",
    "xml.dom.minidom", "glob", "fnmatch", "filecmp", "hashlib", "operator", "numbers", "locale",
)


@dataclass
class Corpus:
    """Token streams: `calibration` (profiling, predictor training) and `evaluation` (held out)."""

    calibration: list[int]
    evaluation: list[int]
    description: str
    sources: list[str] = field(default_factory=list)

    def sequences(self, seq_len: int) -> list[list[int]]:
        """The calibration stream cut into sequences of seq_len tokens (a short tail is kept if >= 16)."""
        out = [self.calibration[i: i + seq_len] for i in range(0, len(self.calibration), seq_len)]
        return [s for s in out if len(s) >= min(16, seq_len)]


def module_docs(name: str) -> str:
    """A module's docstring, then those of its public classes, functions and methods, in name order;
    inherited and repeated docstrings are skipped."""
    with warnings.catch_warnings():  # deprecated modules and attributes warn when touched
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except ImportError:
            return ""
        return _docs_of(name, module)


def _docs_of(name: str, module) -> str:
    seen: set[str] = set()
    parts: list[str] = []

    def add(title: str, obj: object) -> None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or not doc.strip():
            return
        doc = inspect.cleandoc(doc)
        if doc in seen or len(doc) < 40:
            return
        seen.add(doc)
        parts.append(f"{title}\n{doc}")

    add(name, module)
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        add(f"{name}.{attr}", obj)
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if not meth.startswith("_"):
                    add(f"{name}.{attr}.{meth}", vars(obj)[meth])
    return "\n\n".join(parts)


def builtin_texts() -> tuple[list[str], list[str]]:
    """(calibration documents, evaluation documents) of the built-in corpus."""
    calib = [t for t in (module_docs(m) for m in CALIBRATION_MODULES) if t]
    evals = [t for t in (module_docs(m) for m in EVALUATION_MODULES) if t]
    return calib, evals


def read_texts(paths: list[Path]) -> list[str]:
    """Documents of the user's files: a .jsonl file gives one document per line (its `text` field), any
    other file is one plain-text document."""
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise HotcoldError(f"corpus file {path}: no such file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise HotcoldError(f"corpus file {path}: not UTF-8 text") from None
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise HotcoldError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise HotcoldError(f"{path}:{n}: expected an object with a string `text` field")
                docs.append(obj["text"])
        elif raw.strip():
            docs.append(raw)
    if not docs:
        raise HotcoldError("the corpus files hold no text")
    return docs


def _encode(tokenizer, docs: list[str], limit: int) -> list[int]:
    """Documents tokenized and joined with a blank line until `limit` tokens."""
    ids: list[int] = []
    for doc in docs:
        if len(ids) >= limit:
            break
        ids.extend(tokenizer.encode(doc + "\n\n"))
    return ids[:limit]


def build_corpus(tokenizer, paths: list[Path] | None, calibration_tokens: int, evaluation_tokens: int,
                 min_calibration: int = 256) -> Corpus:
    """Tokenize the built-in corpus or the user's files. User files: the last `evaluation_tokens` tokens
    (at most a fifth of the text) are held out for evaluation, calibration takes what comes before."""
    if not paths:
        calib_docs, eval_docs = builtin_texts()
        calib = _encode(tokenizer, calib_docs, calibration_tokens)
        evals = _encode(tokenizer, eval_docs, evaluation_tokens)
        desc = (f"built-in: docstrings of {len(CALIBRATION_MODULES)} Python {_py()} standard-library modules "
                f"(calibration) and {len(EVALUATION_MODULES)} others (held out)")
        sources = [f"stdlib:{m}" for m in CALIBRATION_MODULES]
    else:
        docs = read_texts(paths)
        stream = _encode(tokenizer, docs, 1 << 62)
        n_eval = min(evaluation_tokens, len(stream) // 5)
        evals = stream[len(stream) - n_eval:] if n_eval else []
        calib = stream[: len(stream) - n_eval][:calibration_tokens]
        desc = f"{len(paths)} file(s), {len(docs)} document(s); the last {n_eval} tokens held out"
        sources = [str(p) for p in paths]
    if len(calib) < min_calibration:
        raise HotcoldError(f"the corpus gives only {len(calib)} calibration tokens; at least {min_calibration} "
                           "are needed (add text or omit --corpus for the built-in one)")
    if len(evals) < 64:
        raise HotcoldError(f"the corpus leaves only {len(evals)} tokens for evaluation; add text")
    return Corpus(calib, evals, desc, sources)


def _py() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"
