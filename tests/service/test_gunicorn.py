"""The service under a real gunicorn: two workers, multiprocess metrics, the no-key bind guard."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.service.conftest import MODEL
from tests.service.test_metrics import metric_value

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
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
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(field: str, files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for index, data in enumerate(files):
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{index}.png"\r\n'
                   "Content-Type: image/png\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def gunicorn_server(trained_settings, tmp_path):
    """Run `gunicorn -c gunicorn.conf.py wsgi:app` with two workers on a free loopback port."""
    port = free_port()
    log = (tmp_path / "gunicorn.log").open("w+")
    process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                               env=server_env(trained_settings, PORT=str(port)), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if fetch(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_gunicorn_serves_predictions_and_metrics_from_two_workers(gunicorn_server, digit_pngs):
    base, process = gunicorn_server
    status, body = fetch(f"{base}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}

    data, content_type = multipart("image", list(digit_pngs.values()))
    status, body = fetch(f"{base}/v1/models/{MODEL}/predict?top_k=2", data, {"Content-Type": content_type})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model"] == MODEL and len(answer["predictions"]) == len(digit_pngs)

    for _ in range(6):  # spread over both workers
        assert fetch(f"{base}/healthz")[0] == 200
    status, body = fetch(f"{base}/metrics")
    assert status == 200
    text = body.decode()
    # Multiprocess mode: the counts add up over the workers, whichever one answers /metrics (its
    # registry holds only the workers' files, not the answering process's own collectors).
    assert "python_gc_objects_collected_total" not in text
    assert metric_value(text, "classifier_http_requests_total", endpoint="/healthz", method="GET", status="200") >= 7
    assert metric_value(text, "classifier_http_requests_total", endpoint="/v1/models/<name>/predict",
                        method="POST", status="200") == 1
    assert metric_value(text, "classifier_model_loads_total", model=MODEL) == 1
    assert len(children(process.pid)) == 2


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc: the field after the command name)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_gunicorn_refuses_a_public_address_without_keys(trained_settings):
    result = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=server_env(trained_settings, HOST="0.0.0.0",
                                                                  PORT=str(free_port())))
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr and "TRAINING_API_KEY" in result.stderr
