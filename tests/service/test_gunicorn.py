"""The service under a real gunicorn: two workers, multiprocess metrics, the no-key bind guard."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.live import GUNICORN, ROOT, child_pids, fetch, free_port, gunicorn, multipart, server_env
from tests.service.conftest import MODEL
from tests.service.test_metrics import metric_value


@pytest.fixture
def gunicorn_server(trained_settings, tmp_path):
    """Run `gunicorn -c gunicorn.conf.py wsgi:app` with two workers on a free loopback port."""
    with gunicorn(trained_settings, tmp_path / "gunicorn.log") as server:
        yield server


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
    assert len(child_pids(process.pid)) == 2


def test_gunicorn_refuses_a_public_address_without_keys(trained_settings):
    result = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=server_env(trained_settings, HOST="0.0.0.0",
                                                                  PORT=str(free_port())))
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr and "TRAINING_API_KEY" in result.stderr
