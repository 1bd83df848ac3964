"""Helpers for the job tests, and for the service, web and reliability tests that run real training workers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.live import ROOT, digits_zip
from training.data.store import DatasetStore
from training.jobs.app import INGEST_QUEUE, QUEUE
from training.jobs.records import JobStore
from training.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/15"
# A well-formed id that names no stored dataset (for job records whose dataset is never read).
DATASET_ID = "0123456789abcdef"
PARAMS = {"image_size": 32, "epochs": 3}
# The module a worker loads, as in the Procfile and docker-compose.yml.
WORKER_APP = "training.jobs.worker"


def add_dataset(settings: Settings, per_class: int = 8, classes: int = 3, ingest: bool = True) -> str:
    """Upload a small digits dataset (a zip) to the settings' dataset store, ingested unless told not; return its id."""
    with tempfile.TemporaryDirectory() as folder:
        archive = digits_zip(Path(folder), per_class=per_class, classes=classes)
    store = DatasetStore.from_settings(settings)
    dataset_id = store.add_archive(io.BytesIO(archive), len(archive), "digits.zip")["id"]
    if ingest:
        store.ingest(dataset_id)
    return dataset_id


def worker_env(settings: Settings, broker_url: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "CELERY_BROKER_URL"}
    env.update(MODEL_DIR=str(settings.model_dir), DATA_DIR=str(settings.data_dir), BACKBONE_WEIGHTS="none",
               KERAS_HOME=str(settings.keras_home),
               DATABASE_URL=settings.database_url or f"sqlite:///{settings.data_dir / 'jobs.sqlite3'}",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT),
               JOB_HEARTBEAT_SECONDS=str(settings.job_heartbeat_seconds),
               JOB_STALE_SECONDS=str(settings.job_stale_seconds))
    if broker_url:
        env["CELERY_BROKER_URL"] = broker_url
    return env


# A worker whose runs never look at their cancel request: like a job stuck in one long step.
DEAF_WORKER = ("import sys, training.jobs.runner as runner; from celery.__main__ import main; "
               "runner._Throttled.__call__ = lambda self: False; sys.argv[0] = 'celery'; sys.exit(main())")


def start_worker(settings: Settings, broker_url: str | None, log_file: Path, *, deaf: bool = False,
                 queue: str = QUEUE, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a real Celery worker for `queue` (training: one at a time; ingest: two, as the Procfile starts them)."""
    celery = [sys.executable, "-c", DEAF_WORKER] if deaf else [str(Path(sys.executable).with_name("celery"))]
    concurrency = "2" if queue == INGEST_QUEUE else "1"
    command = [*celery, "-A", WORKER_APP, "worker", "-Q", queue, "--concurrency", concurrency, "--pool", "prefork",
               "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"test-{queue}@%h"]
    with log_file.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env={**worker_env(settings, broker_url), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_ingest_worker(settings: Settings, broker_url: str | None, log_file: Path,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a real Celery ingest worker (`-Q ingest`), as the Procfile and docker-compose.yml do."""
    return start_worker(settings, broker_url, log_file, queue=INGEST_QUEUE, env=env)


def stop_worker(worker: subprocess.Popen) -> None:
    """Warm shutdown by SIGTERM; kill the worker's own process group if it does not exit."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def wait_until_ingested(store: DatasetStore, dataset_id: str, worker: subprocess.Popen, log_file: Path,
                        timeout: float = 60) -> dict:
    """Wait until a dataset is ready or failed; fail with the worker's log when it gets stuck or the worker exits."""
    deadline = time.monotonic() + timeout
    while (record := store.get(dataset_id))["status"] not in ("ready", "failed"):
        if worker.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"dataset {dataset_id} still {record['status']}; worker log:\n"
                        f"{log_file.read_text(errors='replace')[-4000:]}", pytrace=False)
        time.sleep(0.1)
    return record


def wait_until_final(jobs: JobStore, ids: list[str], worker: subprocess.Popen, log_file: Path,
                     timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = [jobs.get(job_id) for job_id in ids]
        if all(r["status"] in ("succeeded", "failed", "cancelled") for r in records):
            return records
        if worker.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"jobs not finished: {[r['status'] for r in records]}; worker log:\n"
                        f"{log_file.read_text(errors='replace')[-4000:]}", pytrace=False)
        time.sleep(0.2)
