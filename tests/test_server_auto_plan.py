"""`hotcold serve --plan auto`: profile once into the cache, reuse afterwards, never use a half-written plan."""

from __future__ import annotations

import pytest

from hotcold.profiler import commands as profile_command
from hotcold.server.commands import auto_plan


def test_auto_plan_profiles_once_and_caches(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HOTCOLD_CACHE", str(tmp_path))
    calls = []

    def fake_run(args):  # stands in for the minutes-long profile: records its arguments, writes a plan file
        calls.append(args)
        args.out.mkdir(parents=True)
        (args.out / "plan.json").write_text("{}")
        return 0

    monkeypatch.setattr(profile_command, "run", fake_run)
    model = str(tiny_checkpoint("relu_llama"))
    first = auto_plan(model, None)
    assert first.parent == tmp_path / "plans" and (first / "plan.json").exists()
    assert str(calls[0].model) == model and calls[0].out.name.endswith(".partial")
    assert auto_plan(model, None) == first and len(calls) == 1  # cached
    assert auto_plan(model, "drelu") != first and len(calls) == 2  # another activation is another model


def test_auto_plan_leaves_no_plan_when_profiling_fails(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HOTCOLD_CACHE", str(tmp_path))

    def failing_run(args):
        args.out.mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(profile_command, "run", failing_run)
    with pytest.raises(RuntimeError):
        auto_plan(str(tiny_checkpoint("relu_llama")), None)
    assert not [p for p in (tmp_path / "plans").iterdir() if not p.name.endswith(".partial")]
