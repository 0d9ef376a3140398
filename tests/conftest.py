"""Session fixtures shared by the whole suite: tiny transformers checkpoints and the default model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny_models` without a package

from tiny_models import make_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests need a CUDA device: where there is none they are skipped, each saying so (the
    GPU machine runs them: benchmarks/gpu_check.sh, which counts any skip there as a failure)."""
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="gpu test: needs a CUDA device, and this machine has none "
                                     "(benchmarks/gpu_check.sh runs it on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seeded_rng() -> None:
    """Every test starts from the same global random state, so a tolerance check on random inputs draws the
    same inputs whatever ran before it (a failure then reproduces alone)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_checkpoint("llama")`` -> folder of that kind, built once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_tiny_checkpoint(kind, root / kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the default model's GGUF (fetched into the cache on first use)."""
    from hotcold.engine.default_model import ensure_default_model

    return Path(ensure_default_model())
