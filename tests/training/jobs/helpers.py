"""Helpers for the job tests, and for the service, web and reliability tests that run real training workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import ROOT
from training.demo import write_digits_dataset
from training.jobs.app import QUEUE
from training.jobs.records import JobStore
from training.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/15"
DATASET_ID = "0123456789abcdef"
PARAMS = {"image_size": 32, "epochs": 3}
# The module a worker loads, as in the Procfile and docker-compose.yml.
WORKER_APP = "training.jobs.worker"


def add_dataset(settings: Settings) -> str:
    """Put a small digits dataset where `DatasetStore.path` finds it; return its id."""
    write_digits_dataset(settings.datasets_dir / DATASET_ID / "data", image_size=32, per_class=8, classes=3)
    return DATASET_ID


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


def start_worker(settings: Settings, broker_url: str | None, log_file: Path, *, deaf: bool = False) -> subprocess.Popen:
    celery = [sys.executable, "-c", DEAF_WORKER] if deaf else [str(Path(sys.executable).with_name("celery"))]
    command = [*celery, "-A", WORKER_APP, "worker", "-Q", QUEUE, "--concurrency", "1", "--pool", "prefork",
               "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", "test@%h"]
    with log_file.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=worker_env(settings, broker_url), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(worker: subprocess.Popen) -> None:
    """Warm shutdown by SIGTERM; kill the worker's own process group if it does not exit."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


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
