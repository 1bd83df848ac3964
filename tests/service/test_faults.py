"""Training jobs through real processes when things go wrong: cancel mid-run, API restart mid-job.

No ingest worker runs here: each job ingests its freshly uploaded dataset itself, as its first phase.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from tests.live import GUNICORN, ROOT, digits_zip, fetch, flush_redis, free_port, server_env, wait_healthy, wait_job
from tests.training.jobs.helpers import start_worker, stop_worker
from training.settings import Settings
from training.store import ModelStore

REDIS_URL = "redis://127.0.0.1:6379/13"
LONG_JOB = {"image_size": 32, "epochs": 300, "patience": 300}


@pytest.fixture
def fault_settings(tmp_path) -> Settings:
    flush_redis(REDIS_URL)
    return Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", backbone_weights="none",
                    keras_home=tmp_path / "keras", celery_broker_url=REDIS_URL,
                    database_url=f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite3'}")  # as the worker's


class Api:
    """The service under a real gunicorn, restartable over the same settings."""

    def __init__(self, settings: Settings, log) -> None:
        self.settings, self.log, self.process = settings, log, None
        self.base = ""

    def start(self) -> Api:
        port = free_port()
        env = server_env(self.settings, PORT=str(port), WEB_CONCURRENCY="1", CELERY_BROKER_URL=REDIS_URL,
                         DATABASE_URL=self.settings.database_url)
        self.process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        wait_healthy(self.base, self.process)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(30)

    def json(self, path: str, body: dict | None = None, method: str = "GET") -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if method == "POST" and data is None:
            data = b""
        status, raw = fetch(f"{self.base}{path}", data, headers)
        return status, json.loads(raw or b"{}")

    def upload(self, archive: bytes, statuses: tuple[int, ...] = (200, 202)) -> str:
        """Upload a dataset archive, expecting one of `statuses`; return its id (its bytes' sha256, 16 characters)."""
        boundary = "faultsboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + archive + f"\r\n--{boundary}--\r\n".encode()
        status, raw = fetch(f"{self.base}/v1/datasets", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status in statuses, (status, raw)
        dataset_id = hashlib.sha256(archive).hexdigest()[:16]  # stored by content: also when the answer is a 503
        assert status >= 300 or json.loads(raw)["id"] == dataset_id, raw
        return dataset_id

    def wait_status(self, job_id: str, wanted: set[str], timeout: float = 120) -> dict:
        return wait_job(self.json, job_id, wanted, timeout)


@pytest.fixture
def running(fault_settings, tmp_path):
    """A real gunicorn API and a real Celery worker over one store, job DB and Redis."""
    log = (tmp_path / "api.log").open("wb")
    api = Api(fault_settings, log).start()
    worker = start_worker(fault_settings, REDIS_URL, tmp_path / "worker.log")
    try:
        yield api, worker
    finally:
        stop_worker(worker)
        api.stop()
        log.close()


@pytest.mark.slow
def test_cancel_a_running_job_through_the_api(running, tmp_path, fault_settings):
    api, _ = running
    dataset = api.upload(digits_zip(tmp_path, per_class=40, classes=10))
    status, answer = api.json("/v1/models/digits/train", {"dataset": dataset, **LONG_JOB}, "POST")
    assert status == 202, answer
    job_id = answer["job"]["id"]
    api.wait_status(job_id, {"running"})
    status, answer = api.json(f"/v1/jobs/{job_id}/cancel", method="POST")
    assert status == 202, answer
    final = api.wait_status(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert final["status"] == "cancelled", final
    assert ModelStore(fault_settings.model_dir).versions("digits") == []


@pytest.mark.slow
def test_restarting_the_api_mid_job_keeps_the_status_right(running, tmp_path, fault_settings):
    api, _ = running
    dataset = api.upload(digits_zip(tmp_path, per_class=40, classes=10))
    status, answer = api.json("/v1/models/digits/train",
                              {"dataset": dataset, "image_size": 32, "epochs": 60, "patience": 60}, "POST")
    assert status == 202, answer
    job_id = answer["job"]["id"]
    api.wait_status(job_id, {"running"})
    api.stop(kill=True)  # the API dies mid-job; the worker goes on
    api.start()
    status, job = api.json(f"/v1/jobs/{job_id}")
    assert status == 200 and job["status"] in ("running", "succeeded"), job
    final = api.wait_status(job_id, {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final
    assert ModelStore(fault_settings.model_dir).versions("digits") == [final["result"]["version"]] == [1]
