"""Triton's interpreter must be switched on before triton is first imported, so the `test_interp_*` cases of
a test file run in a child pytest with TRITON_INTERPRET=1, and the parent keeps the normal JIT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreter_cases(test_file: str, min_passed: int, timeout: float = 600) -> None:
    """Run `test_file`'s test_interp_* cases under the interpreter; all must pass, at least `min_passed`."""
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 already: the test_interp_* cases run in this process")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_", test_file],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout,
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and "failed" not in summary and "skipped" not in summary, out.stdout[-6000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= min_passed, summary
