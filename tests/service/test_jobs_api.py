"""Datasets and training jobs over HTTP, with a real Redis broker and real Celery worker processes (ingest, training).

Needs Redis at redis://127.0.0.1:6379/14 (flushed at the start); the tests fail, never skip,
when it does not answer. Tests run in file order: the cancel test runs before the training worker starts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from service import create_app, extensions
from tests.live import ROOT, zip_folder
from tests.training.jobs.helpers import start_ingest_worker, stop_worker
from training.demo import write_digits_dataset
from training.jobs.records import JobStore
from training.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"
TRAIN_OPTIONS = {"image_size": 32, "epochs": 3}
JOB_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def broker():
    """The Redis test database, emptied; a failure (never a skip) when Redis does not answer."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"these tests need Redis at {REDIS_URL}: {exc}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def job_settings(tmp_path_factory, broker) -> Settings:
    root = tmp_path_factory.mktemp("jobs-api")
    return Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                    keras_home=root / "keras", celery_broker_url=REDIS_URL,
                    database_url=f"sqlite:///{root / 'data' / 'jobs.sqlite3'}")


@pytest.fixture(scope="module")
def japp(job_settings):
    job_settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app({"SETTINGS": job_settings, "TESTING": True})
    yield app
    extensions.close(app)


@pytest.fixture
def jclient(japp):
    return japp.test_client()


@pytest.fixture(scope="module")
def worker(job_settings, tmp_path_factory):
    """Start the real Celery training worker (once, on first call) with the app's settings."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, "MODEL_DIR": str(job_settings.model_dir), "DATA_DIR": str(job_settings.data_dir),
           "BACKBONE_WEIGHTS": "none", "KERAS_HOME": str(job_settings.keras_home),
           "CELERY_BROKER_URL": REDIS_URL, "DATABASE_URL": job_settings.database_url,
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        if not started:
            celery = Path(sys.executable).parent / "celery"
            with log.open("wb") as out:
                started.append(subprocess.Popen(
                    [str(celery), "-A", "training.jobs.worker", "worker", "-Q", "training", "--concurrency", "1",
                     "-l", "info", "--without-gossip", "--without-mingle", "-n", f"test-{os.getpid()}@%h"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        return started[0]

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if started:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="module")
def ingest_worker(job_settings, tmp_path_factory):
    """The real Celery ingest worker (`-Q ingest`), on the same Redis and dataset store."""
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    process = start_ingest_worker(job_settings, REDIS_URL, log)
    yield process
    stop_worker(process)
    sys.stderr.write(log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upload") / "digits"
    write_digits_dataset(root, image_size=32, per_class=8, classes=3)
    return root


@pytest.fixture(scope="module")
def digits_zip(digits) -> bytes:
    return zip_folder(digits)


def upload(client, data: bytes, name: str = "digits.zip"):
    return client.post("/v1/datasets", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def wait_dataset(client, record: dict, timeout: float = 60) -> dict:
    """Follow an uploaded dataset's URL until its ingest ended (ready or failed)."""
    deadline = time.monotonic() + timeout
    while record["status"] in ("queued", "ingesting"):
        assert time.monotonic() < deadline, f"dataset {record['id']} still {record['status']} after {timeout} s"
        time.sleep(0.1)
        record = client.get(record["url"]).get_json()
    return record


@pytest.fixture(scope="module")
def dataset_id(japp, digits_zip, ingest_worker) -> str:
    client = japp.test_client()
    response = upload(client, digits_zip)
    assert response.status_code in (200, 202), response.get_json()
    assert wait_dataset(client, response.get_json())["status"] == "ready"
    return response.get_json()["id"]


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    message = response.get_json()["error"]["message"]
    for word in words:
        assert word in message, message


def wait_final(client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").get_json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


def test_upload_answers_202_at_once_and_the_ingest_worker_reports_counts(jclient, digits, digits_zip, ingest_worker):
    first = upload(jclient, digits_zip)
    assert first.status_code == 202, first.get_json()
    record = first.get_json()
    assert record["status"] in ("queued", "ingesting") and record["existing"] is False
    assert record["url"] == first.headers["Location"] == f"/v1/datasets/{record['id']}"

    ready = wait_dataset(jclient, record)
    labels = sorted(folder.name for folder in digits.iterdir())
    assert ready["status"] == "ready" and ready["error"] is None, ready
    assert ready["classes"] == {label: 8 for label in labels}
    assert ready["images"] == 24 and ready["skipped"] == [] and ready["warnings"]

    again = upload(jclient, digits_zip, "same.zip")
    assert again.status_code == 200 and again.headers["Location"] == record["url"]
    assert again.get_json() == {**ready, "existing": True}  # the record as it is now: ingested once

    assert record["id"] in [d["id"] for d in jclient.get("/v1/datasets").get_json()["datasets"]]
    assert_error(jclient.get("/v1/datasets/0123456789abcdef"), 404, "0123456789abcdef")
    assert_error(jclient.get("/v1/datasets/not-hex"), 400, "dataset_id")


def test_a_dataset_that_cannot_be_trained_on_ends_failed_and_train_refuses_it(jclient, digits, tmp_path,
                                                                               ingest_worker):
    assert_error(upload(jclient, b"this is not an archive at all"), 400, "'digits.zip' does not start like one")
    one = tmp_path / "one"
    label = sorted(folder.name for folder in digits.iterdir())[0]
    (one / label).mkdir(parents=True)
    for path in sorted((digits / label).iterdir()):
        (one / label / path.name).write_bytes(path.read_bytes())
    accepted = upload(jclient, zip_folder(one))
    assert accepted.status_code == 202, accepted.get_json()

    failed = wait_dataset(jclient, accepted.get_json())
    assert failed["status"] == "failed" and "classes" not in failed
    assert "at least 2 classes" in failed["error"] and label in failed["error"]
    assert_error(jclient.post("/v1/models/one/train", json={"dataset": failed["id"]}), 400,
                 f"dataset {failed['id']} cannot be trained on", "at least 2 classes")
    assert_error(jclient.post("/v1/models/one/train", content_type="multipart/form-data",
                              data={"file": (io.BytesIO(zip_folder(one)), "one.zip")}), 400, "at least 2 classes")
    assert jobs_of(jclient, "one") == []
    assert_error(jclient.post("/v1/datasets", data={"other": "x"}, content_type="multipart/form-data"), 400, "file")
    assert_error(jclient.post("/v1/datasets"), 400, "file")
    assert_error(jclient.post("/v1/datasets", json={"file": "x"}), 415)


def test_an_upload_with_the_broker_down_is_stored_queued_and_sent_when_uploaded_again(jclient, digits, tmp_path,
                                                                                      monkeypatch, ingest_worker):
    class DeadBroker(StandInBroker):
        def send_task(self, *args, **kwargs):
            raise ConnectionRefusedError("Error 111 connecting to redis:6379")

    buffer = io.BytesIO(zip_folder(digits))
    with zipfile.ZipFile(buffer, "a") as bundle:
        bundle.comment = b"other bytes, the same images: a dataset of its own"
    archive = buffer.getvalue()
    with monkeypatch.context() as patch:
        patch.setattr("service.api.datasets.get_celery", DeadBroker)
        down = upload(jclient, archive)
    assert_error(down, 503, "queued", "ingest queue", "reconciler", "uploading the same file again")
    assert down.headers["Retry-After"] and down.headers["Location"].startswith("/v1/datasets/")
    assert jclient.get(down.headers["Location"]).get_json()["status"] == "queued"

    back = upload(jclient, archive)  # the real broker
    assert back.status_code == 200 and back.get_json()["existing"] is True
    assert wait_dataset(jclient, back.get_json())["status"] == "ready"


def test_bad_train_requests_are_refused_before_a_job_exists(jclient, dataset_id):
    assert_error(jclient.post("/v1/models/bad/train", json={"dataset": dataset_id, "epochs": "many"}), 400, "epochs")
    assert_error(jclient.post("/v1/models/bad/train", json={"dataset": dataset_id, "epoch": 3}), 400, "epoch")
    assert_error(jclient.post("/v1/models/bad/train", json={"dataset": "0123456789abcdef"}), 404, "0123456789abcdef")
    assert_error(jclient.post("/v1/models/bad/train", json={"dataset": "../x"}), 400, "dataset_id")
    assert_error(jclient.post("/v1/models/bad/train", json={"epochs": 3}), 400, "dataset")
    assert_error(jclient.post("/v1/models/bad/train", json=[1]), 400)
    assert_error(jclient.post("/v1/models/-bad/train", json={"dataset": dataset_id}), 400, "model name")
    assert_error(jclient.post("/v1/models/bad/train", data="x", content_type="text/plain"), 415)
    assert_error(jclient.post("/v1/models/bad/train", data={"epochs": "3"}, content_type="multipart/form-data"),
                 400, "file")
    assert [job for job in jclient.get("/v1/jobs").get_json()["jobs"] if job["model"] == "bad"] == []
    for response in (jclient.get("/v1/jobs/nope"), jclient.post("/v1/jobs/nope/cancel"),
                     jclient.get("/v1/jobs/nope/events")):
        assert_error(response, 404, "nope")
    assert_error(jclient.get("/v1/jobs?status=lost"), 400, "status")
    assert_error(jclient.get("/v1/jobs?limit=0"), 400, "limit")


class StandInBroker:
    """Stands in for the Celery app of a broker server (Redis): `enqueue` has no folders to make for it."""

    conf = SimpleNamespace(broker_transport_options={})


def test_broker_down_answers_503_and_keeps_the_job_queued(jclient, dataset_id, monkeypatch):
    class DeadBroker(StandInBroker):
        def send_task(self, *args, **kwargs):
            raise ConnectionRefusedError("Error 111 connecting to redis:6379")

    monkeypatch.setattr("service.api.jobs.get_celery", DeadBroker)
    response = jclient.post("/v1/models/later/train", json={"dataset": dataset_id})
    assert_error(response, 503, "queued", "reconciler", "same Idempotency-Key will not duplicate the job")
    assert response.headers["Retry-After"]
    job = jclient.get(response.headers["Location"]).get_json()
    assert job["status"] == "queued" and job["model"] == "later"
    assert jclient.post(f"/v1/jobs/{job['id']}/cancel").get_json()["status"] == "cancelled"


class RecordingBroker(StandInBroker):
    """Stands in for the Celery app: records which jobs were sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_task(self, name, args=None, queue=None, task_id=None, **kwargs):
        assert task_id == args[0]  # the task id is the job id, so the reconciler can revoke it
        self.sent.append(task_id)


@pytest.fixture
def recording_broker(monkeypatch) -> RecordingBroker:
    recorder = RecordingBroker()
    monkeypatch.setattr("service.api.jobs.get_celery", lambda: recorder)
    return recorder


def jobs_of(client, model: str) -> list[dict]:
    return [job for job in client.get("/v1/jobs").get_json()["jobs"] if job["model"] == model]


def cancel_all(client, model: str) -> None:
    """Cancel the test's queued jobs, so the worker started later drops their messages instead of training."""
    for job in jobs_of(client, model):
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_the_same_idempotency_key_twice_records_one_job(jclient, dataset_id, recording_broker):
    body = {"dataset": dataset_id, "epochs": 3}
    first = jclient.post("/v1/models/once/train", json=body, headers={"Idempotency-Key": "req-0001"})
    again = jclient.post("/v1/models/once/train", json=body, headers={"Idempotency-Key": "req-0001"})
    assert first.status_code == again.status_code == 202, again.get_json()
    job = first.get_json()["job"]
    assert again.get_json()["job"]["id"] == job["id"] and again.headers["Location"] == job["url"]
    assert job["idempotency_key"] == "req-0001"
    assert [j["id"] for j in jobs_of(jclient, "once")] == [job["id"]]
    assert recording_broker.sent == [job["id"], job["id"]]  # still queued: sent again, it runs once all the same

    other = jclient.post("/v1/models/once/train", json=body, headers={"Idempotency-Key": "req-0002"})
    unkeyed = jclient.post("/v1/models/once/train", json=body)
    assert other.status_code == unkeyed.status_code == 202
    assert len({j["id"] for j in jobs_of(jclient, "once")}) == 3

    jclient.post(f"/v1/jobs/{job['id']}/cancel")
    cancelled = jclient.post("/v1/models/once/train", json=body, headers={"Idempotency-Key": "req-0001"})
    assert cancelled.status_code == 202 and cancelled.get_json()["job"]["status"] == "cancelled"
    assert recording_broker.sent.count(job["id"]) == 2  # a job that is no longer queued is not sent again
    cancel_all(jclient, "once")


def test_an_idempotency_key_reused_for_another_request_is_a_conflict(jclient, dataset_id, recording_broker):
    first = jclient.post("/v1/models/first/train", json={"dataset": dataset_id}, headers={"Idempotency-Key": "k-409"})
    assert first.status_code == 202
    job_id = first.get_json()["job"]["id"]
    assert_error(jclient.post("/v1/models/second/train", json={"dataset": dataset_id},
                              headers={"Idempotency-Key": "k-409"}), 409, job_id, "received: model 'second'")
    assert_error(jclient.post("/v1/models/first/train", json={"dataset": dataset_id, "epochs": 7},
                              headers={"Idempotency-Key": "k-409"}), 409, "params")
    assert jobs_of(jclient, "second") == [] and len(jobs_of(jclient, "first")) == 1
    assert recording_broker.sent == [job_id]
    cancel_all(jclient, "first")


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
def test_a_bad_idempotency_key_is_refused_naming_the_header(jclient, dataset_id, recording_broker, key):
    response = jclient.post("/v1/models/badkey/train", json={"dataset": dataset_id}, headers={"Idempotency-Key": key})
    assert_error(response, 400, "Idempotency-Key", "received: ")
    assert len(response.get_json()["error"]["message"]) < 300  # a long key is not echoed whole
    assert jobs_of(jclient, "badkey") == [] and recording_broker.sent == []


def test_requests_racing_with_one_idempotency_key_record_one_job(japp, jclient, dataset_id, recording_broker):
    barrier = threading.Barrier(4)

    def post(_: int) -> tuple[int, str]:
        client = japp.test_client()
        barrier.wait()
        response = client.post("/v1/models/raced/train", json={"dataset": dataset_id},
                               headers={"Idempotency-Key": "one-key"})
        return response.status_code, response.get_json()["job"]["id"]

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(post, range(4)))
    assert {status for status, _ in outcomes} == {202}
    assert len({job_id for _, job_id in outcomes}) == 1 and len(jobs_of(jclient, "raced")) == 1
    cancel_all(jclient, "raced")


def test_a_retry_with_the_same_key_once_the_broker_is_back_sends_the_same_job(jclient, dataset_id, monkeypatch,
                                                                               broker):
    class DeadBroker(StandInBroker):
        def send_task(self, *args, **kwargs):
            raise ConnectionRefusedError("Error 111 connecting to redis:6379")

    headers = {"Idempotency-Key": "retry-after-outage"}
    with monkeypatch.context() as patch:
        patch.setattr("service.api.jobs.get_celery", DeadBroker)
        down = jclient.post("/v1/models/outage/train", json={"dataset": dataset_id}, headers=headers)
    assert_error(down, 503, "queued", "reconciler", "a retry with the same Idempotency-Key", "not duplicate")
    job_id = jclient.get(down.headers["Location"]).get_json()["id"]
    assert not any(job_id.encode() in message for message in broker.lrange("training", 0, -1))

    back = jclient.post("/v1/models/outage/train", json={"dataset": dataset_id}, headers=headers)  # the real broker

    assert back.status_code == 202 and back.get_json()["job"]["id"] == job_id
    (sent,) = [message for message in broker.lrange("training", 0, -1) if job_id.encode() in message]
    assert [j["id"] for j in jobs_of(jclient, "outage")] == [job_id]
    cancel_all(jclient, "outage")
    broker.lrem("training", 0, sent)  # spare the worker started later a child process just to drop it


def test_the_train_endpoint_documents_the_idempotency_key(jclient):
    train = jclient.get("/openapi.json").get_json()["paths"]["/v1/models/{name}/train"]["post"]
    (header,) = [p for p in train["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and header["required"] is False
    assert header["schema"]["maxLength"] == 255
    assert {"202", "400", "409", "503"} <= set(train["responses"])


def test_cancelled_queued_job_never_trains(jclient, dataset_id, worker, broker):
    response = jclient.post("/v1/models/never/train", json={"dataset": dataset_id, **TRAIN_OPTIONS})
    assert response.status_code == 202
    job_id = response.get_json()["job"]["id"]
    cancelled = jclient.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.get_json()["status"] == "cancelled"
    worker()  # The message is still in the queue: the worker must drop it.
    deadline = time.monotonic() + 30
    while broker.llen("training") or broker.hlen("unacked"):
        assert time.monotonic() < deadline, "the worker did not take the cancelled job's message"
        time.sleep(0.2)
    time.sleep(0.5)
    assert jclient.get(f"/v1/jobs/{job_id}").get_json()["status"] == "cancelled"
    assert jclient.get("/v1/models/never").status_code == 404


def test_training_jobs_run_on_a_real_worker_then_serve(jclient, dataset_id, digits, digits_zip, worker):
    worker()
    by_json = jclient.post("/v1/models/json-digits/train", json={"dataset": dataset_id, **TRAIN_OPTIONS})
    assert by_json.status_code == 202, by_json.get_json()
    job = by_json.get_json()["job"]
    assert job["status"] == "queued" and job["url"] == f"/v1/jobs/{job['id']}" == by_json.headers["Location"]
    assert "worker" not in job

    form = {key: str(value) for key, value in TRAIN_OPTIONS.items()}
    by_form = jclient.post("/v1/models/form-digits/train", content_type="multipart/form-data",
                           data={"file": (io.BytesIO(digits_zip), "digits.zip"), **form})
    assert by_form.status_code == 202, by_form.get_json()
    assert by_form.get_json()["dataset"]["id"] == dataset_id  # the same bytes: the same dataset
    assert by_form.get_json()["job"]["params"] == TRAIN_OPTIONS  # form strings stored as typed values

    for envelope, model in ((by_json, "json-digits"), (by_form, "form-digits")):
        done = wait_final(jclient, envelope.get_json()["job"]["id"])
        assert done["status"] == "succeeded", done
        assert done["result"]["version"] == 1 and done["model"] == model and "worker" not in done

    image = sorted(next(iter(sorted(digits.iterdir()))).glob("*.png"))[0].read_bytes()
    predicted = jclient.post("/v1/models/json-digits/predict", content_type="multipart/form-data",
                             data={"image": (io.BytesIO(image), "x.png")})
    assert predicted.status_code == 200, predicted.get_json()
    assert predicted.get_json()["version"] == 1

    listed = jclient.get("/v1/jobs?status=succeeded&limit=10").get_json()["jobs"]
    assert {j["model"] for j in listed} >= {"json-digits", "form-digits"}
    assert all("worker" not in j for j in listed)

    events = jclient.get(f"/v1/jobs/{job['id']}/events")
    assert events.status_code == 200 and events.mimetype == "text/event-stream"
    assert events.headers["Cache-Control"] == "no-cache" and events.headers["X-Accel-Buffering"] == "no"
    blocks = [block for block in events.get_data(as_text=True).split("\n\n") if block.strip()]
    assert len(blocks) == 1, blocks
    event, data = blocks[0].split("\n")
    assert event == "event: job"
    final = json.loads(data.removeprefix("data: "))
    assert final["id"] == job["id"] and final["status"] == "succeeded" and final["result"]["version"] == 1


def test_the_web_process_never_decodes_dataset_images(jclient, digits, tmp_path, monkeypatch, ingest_worker, worker):
    worker()
    sent = []

    def refuse(*args, **kwargs):
        raise AssertionError("the web process decoded a dataset image")

    # Every way this process could decode an image fails the request (a 500); the workers are other processes.
    for name in ("training.images.decode_image", "training.images.preprocess_image",
                 "training.data.ingest.decode_image", "PIL.Image.open"):
        monkeypatch.setattr(name, refuse)
    monkeypatch.setattr("training.jobs.app.enqueue_ingest", lambda app, dataset_id: sent.append(dataset_id))
    uploaded, attached = (tmp_path / "uploaded", tmp_path / "attached")
    for folder, count in ((uploaded, 6), (attached, 7)):  # two new datasets, never seen by this module
        for label in sorted(path.name for path in digits.iterdir()):
            (folder / label).mkdir(parents=True)
            for path in sorted((digits / label).iterdir())[:count]:
                (folder / label / path.name).write_bytes(path.read_bytes())

    stored = upload(jclient, zip_folder(uploaded))
    assert stored.status_code == 202 and sent == [stored.get_json()["id"]], stored.get_json()
    form = {key: str(value) for key, value in TRAIN_OPTIONS.items()}
    trained = jclient.post("/v1/models/undecoded/train", content_type="multipart/form-data",
                           data={"file": (io.BytesIO(zip_folder(attached)), "attached.zip"), **form})
    assert trained.status_code == 202, trained.get_json()
    dataset = trained.get_json()["dataset"]
    assert dataset["status"] == "queued" and dataset["existing"] is False
    assert sent == [stored.get_json()["id"]]  # no ingest message for the attached archive: the job ingests it

    done = wait_final(jclient, trained.get_json()["job"]["id"])
    assert done["status"] == "succeeded", done
    ready = jclient.get(dataset["url"]).get_json()
    assert ready["status"] == "ready" and ready["classes"] == {label: 7 for label in ready["classes"]}
    assert len(ready["classes"]) == 3


def test_event_stream_sends_changes_keepalives_and_ends():
    from service.api.jobs import job_events

    states = iter(["queued", "queued", "running", "running", "succeeded"])

    class Jobs:
        def get(self, job_id):
            return {"id": job_id, "status": next(states), "worker": "host:1"}

    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    stream = list(job_events(Jobs(), "j", "/v1/jobs/j", poll_s=10, keepalive_s=5, clock=lambda: now[0],
                             sleep=sleep))
    assert [line.split("\n")[0] for line in stream] == ["event: job", ": keep-alive", "event: job", ": keep-alive",
                                                        "event: job"]
    assert all("host" not in line for line in stream)
    assert json.loads(stream[-1].split("data: ")[1])["status"] == "succeeded"

    endless = list(job_events(type("Stuck", (), {"get": lambda self, i: {"id": i, "status": "running"}})(), "j",
                              "/v1/jobs/j", poll_s=1, keepalive_s=100, lifetime_s=3, clock=lambda: now[0],
                              sleep=sleep))
    assert endless[0].startswith("event: job") and "lifetime" in endless[-1] and len(endless) == 2


def test_event_streams_are_capped_so_predictions_keep_their_threads(japp, job_settings, dataset_id):
    job = JobStore.from_settings(job_settings).create("digits", dataset_id, {})  # stays queued: no worker here
    japp.config["SETTINGS"] = dataclasses.replace(job_settings, event_streams=2)
    japp.extensions.pop("event_streams", None)
    client = japp.test_client()
    url = f"/v1/jobs/{job['id']}/events"
    try:
        first, second = (client.get(url, buffered=False) for _ in range(2))
        assert first.status_code == second.status_code == 200
        assert next(first.response).startswith(b"event: job")

        refused = client.get(url)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.get_json()["error"]["code"] == "overloaded"
        assert "poll GET /v1/jobs/" in refused.get_json()["error"]["message"]

        first.close()  # the client went away: its slot is free again
        third = client.get(url, buffered=False)
        assert third.status_code == 200
        third.close()
        second.close()
    finally:
        japp.config["SETTINGS"] = job_settings
        japp.extensions.pop("event_streams", None)
