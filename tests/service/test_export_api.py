"""GET /v1/models/{name}/versions/{v}/export with a real Redis and a real Celery training worker.

The first GET answers 202 and sends one message; the worker exports; a later GET streams the
archive, which loads in its own runtime (onnxruntime, as Triton would) and answers what v1 answers.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import tarfile
import time

import numpy as np
import onnxruntime
import pytest
import redis

import training.exports as exports_module
from service import create_app, extensions
from tests.live import flush_redis
from tests.service.conftest import MODEL
from tests.service.test_inference_v2 import rgb_pixels
from tests.training.jobs.helpers import start_worker, stop_worker
from training.jobs.app import QUEUE

REDIS_URL = "redis://127.0.0.1:6379/13"
EXPORT_TIMEOUT_S = 240
TRAIN_KEY, PREDICT_KEY = "export-train-key", "export-predict-key"
AUTH = {"Authorization": f"Bearer {TRAIN_KEY}"}


@pytest.fixture(scope="module")
def broker():
    """The Redis test database, emptied (a failure, never a skip, when Redis does not answer)."""
    client = redis.Redis.from_url(flush_redis(REDIS_URL), socket_timeout=5)
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def export_settings(trained_settings, tmp_path_factory, broker):
    """A private copy of the trained store, on the Redis broker, with keys."""
    root = tmp_path_factory.mktemp("export-api")
    shutil.copytree(trained_settings.model_dir, root / "models")
    return dataclasses.replace(trained_settings, model_dir=root / "models", data_dir=root / "data",
                               celery_broker_url=REDIS_URL, training_api_key=TRAIN_KEY,
                               prediction_api_key=PREDICT_KEY)


@pytest.fixture(scope="module")
def eclient(export_settings):
    export_settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app({"SETTINGS": export_settings, "TESTING": True})
    yield app.test_client()
    extensions.close(app)


@pytest.fixture(scope="module")
def worker(export_settings, tmp_path_factory):
    log = tmp_path_factory.mktemp("export-worker") / "worker.log"
    process = start_worker(export_settings, REDIS_URL, log)
    yield process, log
    stop_worker(process)


def export_url(fmt: str, version: int = 1) -> str:
    return f"/v1/models/{MODEL}/versions/{version}/export?format={fmt}"


def test_bad_requests_are_answered_before_anything_is_sent(eclient, broker):
    assert eclient.get(export_url("pb"), headers=AUTH).status_code == 400
    assert eclient.get(export_url("onnx", 9), headers=AUTH).status_code == 404
    assert eclient.get(export_url("onnx"), headers={"Authorization": f"Bearer {PREDICT_KEY}"}).status_code == 403
    assert broker.llen(QUEUE) == 0


def test_a_broker_outage_answers_503_and_a_later_get_sends_the_request(eclient, broker, monkeypatch):
    from celery import Celery

    def down(self, *args, **kwargs):
        raise ConnectionError("broker down")

    with monkeypatch.context() as patch:
        patch.setattr(Celery, "send_task", down)
        response = eclient.get(export_url("keras"), headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.headers["Location"] == export_url("keras")
    # Recorded as asked for: a GET now says queued and sends nothing; once the message is known lost, it is resent.
    assert eclient.get(export_url("keras"), headers=AUTH).get_json()["export"]["status"] == "queued"
    assert broker.llen(QUEUE) == 0
    later = time.time() + exports_module.RESEND_AFTER_S + 1
    with monkeypatch.context() as patch:
        patch.setattr(exports_module.time, "time", lambda: later)
        assert eclient.get(export_url("keras"), headers=AUTH).status_code == 202
    assert broker.llen(QUEUE) == 1
    broker.delete(QUEUE)  # the worker of the next test is not to export this one


def test_the_worker_exports_once_and_the_archive_answers_what_v1_answers(eclient, broker, worker, digit_pngs):
    first = eclient.get(export_url("onnx"), headers=AUTH)
    assert first.status_code == 202, first.data
    assert first.get_json()["export"]["status"] == "queued" and first.headers["Retry-After"]
    assert eclient.get(export_url("onnx"), headers=AUTH).status_code == 202  # a second GET sends nothing more
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while (response := eclient.get(export_url("onnx"), headers=AUTH)).status_code == 202:
        process, log = worker
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(1)
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/gzip"
    assert f"{MODEL}-v1-onnx.tar.gz" in response.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.data)) as tar:
        names = tar.getnames()
        model_bytes = tar.extractfile(f"{MODEL}/1/model.onnx").read()
        labels = tar.extractfile("labels.txt").read().decode().split()
    assert f"{MODEL}/config.pbtxt" in names and "README.md" in names

    images = list(digit_pngs.values())
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: rgb_pixels(images).astype(np.float32)}
    exported = session.run(None, feed)[0]
    served = eclient.post(f"/v1/models/{MODEL}/predict?top_k=10", headers=AUTH,
                          data={"image": [(io.BytesIO(image), f"{i}.png") for i, image in enumerate(images)]})
    rows = [{item["label"]: item["probability"] for item in p["top_k"]} for p in served.get_json()["predictions"]]
    expected = np.array([[row[label] for label in labels] for row in rows])
    assert (exported.argmax(1) == expected.argmax(1)).all()
    assert np.abs(exported - expected).max() <= 1e-4


def test_deleting_a_version_removes_its_exports(eclient, export_settings):
    models = export_settings.model_dir / MODEL
    shutil.copytree(models / "1", models / "2")
    (export_settings.data_dir / "exports" / MODEL / "2").mkdir(parents=True)
    (export_settings.data_dir / "exports" / MODEL / "2" / "onnx.tar.gz").write_bytes(b"old")
    assert eclient.delete(f"/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 204
    assert not (export_settings.data_dir / "exports" / MODEL / "2").exists()
