"""Helpers for tests that run the service as real processes: ports, environment, HTTP, readiness."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI provides PostgreSQL here; the variable only lets a developer point elsewhere.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(settings, **extra: str) -> dict[str, str]:
    """The environment of a gunicorn run over the trained store (the settings reach it as env vars)."""
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir),
                "BACKBONE_WEIGHTS": "none", "KERAS_HOME": str(settings.keras_home), "TF_CPP_MIN_LOG_LEVEL": "2",
                "HOST": "127.0.0.1", "WEB_CONCURRENCY": "2", "THREADS": "4", "TRAINING_API_KEY": "",
                "PREDICTION_API_KEY": ""})
    env.update(extra)
    return env


def fetch(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """GET (or POST `data`); the status and body, error statuses included."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(field: str, files: list[bytes], names: list[str] | None = None) -> tuple[bytes, str]:
    """A multipart body with each of `files` as a part named `field` (file names `names`, else
    0.png, 1.png, ...), and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for index, data in enumerate(files):
        name = names[index] if names else f"{index}.png"
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def wait_healthy(base: str, process: subprocess.Popen, log_path: Path | None = None, timeout: float = 60) -> None:
    """Wait until `base`/healthz answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fetch(f"{base}/healthz")[0] == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise AssertionError(f"{base} did not become healthy (exit code {process.poll()}):\n{tail}")
        time.sleep(0.2)


def wait_job(get: Callable[[str], tuple[int, dict]], job_id: str, wanted: Collection[str], timeout: float,
             describe: Callable[[], str] = lambda: "") -> dict:
    """Poll `GET /v1/jobs/{id}` through `get` until the job's status is one of `wanted`; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = get(f"/v1/jobs/{job_id}")
        assert status == 200, job
        if job["status"] in wanted:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {timeout} s: {job}{describe()}", pytrace=False)
        time.sleep(0.2)


def flush_redis(url: str) -> str:
    """Empty one database of the machine's Redis; fail (never skip) when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"these tests need Redis at {url} (CI starts one): {exc}", pytrace=False)
    finally:
        client.close()
    return url


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop a server process: SIGTERM (a graceful shutdown), SIGKILL if it is still there after `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def gunicorn(settings, log_path: Path, **env: str):
    """Run `gunicorn -c gunicorn.conf.py wsgi:app` over `settings` on a free loopback port, until healthy;
    yield (base URL, process); stop it afterwards. `env` adds or overrides environment variables."""
    port = free_port()
    with open(log_path, "w+") as log:
        process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                                   env=server_env(settings, PORT=str(port), **env), stdout=log,
                                   stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, process, log_path)
            yield base, process
        finally:
            stop(process)


def child_pids(pid: int) -> set[int]:
    """Process ids whose parent is `pid` (from /proc: the field after the command name)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def zip_folder(folder: Path) -> bytes:
    """A zip of `folder`'s files, class folders at the archive's root."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def digits_zip(folder: Path, per_class: int = 8, classes: int = 3) -> bytes:
    """scikit-learn's digits (32 px PNGs, one folder per class) written under `folder`, as a zip."""
    from training.demo import write_digits_dataset

    root = folder / f"digits-{per_class}x{classes}"
    write_digits_dataset(root, image_size=32, per_class=per_class, classes=classes)
    return zip_folder(root)


@contextlib.contextmanager
def postgres_schema(prefix: str = "test"):
    """A URL on the test PostgreSQL whose connections use a fresh schema, dropped afterwards (fails loudly
    when PostgreSQL does not answer: `.ci/run` starts it)."""
    import sqlalchemy as sa

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} does not answer (set TEST_POSTGRES_URL to another one): {exc}",
                    pytrace=False)
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
