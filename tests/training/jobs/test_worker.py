"""Real Celery workers (`celery -A training.jobs.worker`) on Redis and on the embedded filesystem broker: training
workers, and ingest workers that never load TensorFlow."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.live import child_pids
from tests.training.jobs.helpers import (
    PARAMS,
    add_dataset,
    start_ingest_worker,
    start_worker,
    stop_worker,
    wait_until_final,
    wait_until_ingested,
)
from training.data.store import DatasetStore
from training.jobs.app import enqueue, enqueue_ingest, make_celery
from training.jobs.reconciler import reconcile
from training.jobs.records import JobStore
from training.settings import Settings
from training.store import ModelStore


@pytest.mark.slow
def test_real_worker_on_redis_runs_jobs_one_after_the_other(settings, redis_url, tmp_path):
    settings = dataclasses.replace(settings, celery_broker_url=redis_url,
                                   database_url=f"sqlite:///{settings.data_dir / 'jobs.sqlite3'}")
    dataset = add_dataset(settings)
    jobs = JobStore.from_settings(settings)
    app = make_celery(settings)
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, redis_url, log_file)
    try:
        ids = [jobs.create("digits", dataset, PARAMS)["id"] for _ in range(2)]
        for job_id in ids:
            enqueue(app, job_id)
        first, second = wait_until_final(jobs, ids, worker, log_file)
    finally:
        stop_worker(worker)
        jobs.close()

    assert first["status"] == second["status"] == "succeeded", (first["error"], second["error"])
    assert {first["result"]["version"], second["result"]["version"]} == {1, 2}
    earlier, later = sorted([first, second], key=lambda r: r["started_at"])
    assert datetime.fromisoformat(later["started_at"]) >= datetime.fromisoformat(earlier["finished_at"])
    assert worker.returncode == 0, log_file.read_text(errors="replace")[-4000:]


@pytest.mark.slow
def test_real_worker_on_embedded_filesystem_broker(settings, tmp_path):
    dataset = add_dataset(settings)
    jobs = JobStore.from_settings(settings)
    app = make_celery(settings)
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, None, log_file)
    try:
        job_id = jobs.create("digits", dataset, PARAMS)["id"]
        enqueue(app, job_id)
        (done,) = wait_until_final(jobs, [job_id], worker, log_file)
    finally:
        stop_worker(worker)
        jobs.close()

    assert done["status"] == "succeeded", done["error"]
    assert ModelStore(settings.model_dir).versions("digits") == [1]
    assert worker.returncode == 0, log_file.read_text(errors="replace")[-4000:]


@pytest.mark.slow
def test_sigkilled_worker_mid_job_is_rerun_once_and_never_stuck(settings, redis_url, tmp_path):
    settings = dataclasses.replace(settings, celery_broker_url=redis_url, job_heartbeat_seconds=0.5,
                                   job_stale_seconds=3)
    dataset = add_dataset(settings, per_class=40, classes=10)
    store = JobStore.from_settings(settings)
    app = make_celery(settings)
    job = store.create("digits", dataset, {"image_size": 32, "epochs": 200, "patience": 200})
    enqueue(app, job["id"])
    first = start_worker(settings, redis_url, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        while store.get(job["id"])["status"] != "running":
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool child, mid-training
        first.wait(10)
        assert store.get(job["id"])["status"] == "running"  # nobody knows yet

        second = start_worker(settings, redis_url, tmp_path / "second.log")
        try:
            deadline = time.monotonic() + 120
            while store.get(job["id"])["status"] in ("queued", "running"):
                reconcile(settings, app)  # what `python -m training reconcile --every N` does
                assert time.monotonic() < deadline and second.poll() is None, \
                    (tmp_path / "second.log").read_text()[-3000:]
                time.sleep(0.5)
        finally:
            stop_worker(second)
        final = store.get(job["id"])
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        assert ModelStore(settings.model_dir).versions("digits") == [final["result"]["version"]] == [1]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        store.close()


@pytest.mark.slow
def test_a_run_that_ignores_its_cancel_is_killed_after_the_grace_period(settings, redis_url, tmp_path):
    settings = dataclasses.replace(settings, celery_broker_url=redis_url, job_heartbeat_seconds=0.5,
                                   job_stale_seconds=60, job_cancel_grace_seconds=1)
    dataset = add_dataset(settings, per_class=40, classes=10)
    jobs = JobStore.from_settings(settings)
    app = make_celery(settings)
    job = jobs.create("digits", dataset, {"image_size": 32, "epochs": 500, "patience": 500})
    enqueue(app, job["id"])
    log_file = tmp_path / "worker.log"
    worker = start_worker(settings, redis_url, log_file, deaf=True)
    try:
        deadline = time.monotonic() + 90
        while (record := jobs.get(job["id"]))["progress"] is None or record["progress"]["phase"] != "head":
            assert time.monotonic() < deadline and worker.poll() is None, log_file.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        jobs.request_cancel(job["id"])
        time.sleep(2)
        assert jobs.get(job["id"])["status"] == "running"  # the run ignores the request

        assert reconcile(settings, app)["killed"] == 1
        killed = jobs.get(job["id"])
        assert killed["status"] == "cancelled" and "JOB_CANCEL_GRACE_SECONDS" in killed["error"]
        # The run is gone: no more heartbeats or progress, and no version appears.
        progress = killed["progress"]
        time.sleep(3)
        assert jobs.get(job["id"])["progress"] == progress
        log = log_file.read_text(errors="replace")
        assert f"Terminating {job['id']}" in log, log[-3000:]  # Celery's own word that it killed this task

        # The worker lives on (a fresh child) and takes the next job; the killed one never runs again.
        next_job = jobs.create("digits", dataset, PARAMS)
        enqueue(app, next_job["id"])
        (done,) = wait_until_final(jobs, [next_job["id"]], worker, log_file, timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert jobs.get(job["id"])["status"] == "cancelled" and jobs.get(job["id"])["attempts"] == 1
        assert ModelStore(settings.model_dir).versions("digits") == [1]
    finally:
        stop_worker(worker)
        jobs.close()


def loaded_tensorflow(pids: set[int]) -> list[int]:
    """The processes among `pids` that have TensorFlow's library mapped (imported it)."""
    found = []
    for pid in pids:
        try:
            maps = open(f"/proc/{pid}/maps").read()
        except OSError:
            continue  # exited meanwhile
        if "tensorflow" in maps:
            found.append(pid)
    return found


@pytest.mark.slow
def test_a_real_ingest_worker_on_the_embedded_broker_ingests_once_without_tensorflow(settings, tmp_path):
    datasets = DatasetStore.from_settings(settings)
    good = add_dataset(settings, ingest=False)
    one_class = add_dataset(settings, classes=1, ingest=False)  # fails, naming the rule it breaks
    app = make_celery(settings)
    for dataset_id in (good, good, one_class):  # the same dataset twice: a duplicate message does nothing more
        enqueue_ingest(app, dataset_id)
    log_file = tmp_path / "ingest.log"
    worker = start_ingest_worker(settings, None, log_file)
    try:
        ready = wait_until_ingested(datasets, good, worker, log_file)
        failed = wait_until_ingested(datasets, one_class, worker, log_file)
        time.sleep(1)  # both of the good dataset's messages taken
        assert loaded_tensorflow({worker.pid, *child_pids(worker.pid)}) == []
    finally:
        stop_worker(worker)

    assert ready["status"] == "ready" and ready["classes"] == {"zero": 8, "one": 8, "two": 8}, ready
    assert failed["status"] == "failed" and "at least 2 classes" in failed["error"], failed
    assert datasets.dataset(good).items[0].path.is_file()
    log = log_file.read_text(errors="replace")
    assert log.count(f"dataset {good} ready") == 2 and log.count(f"dataset {one_class} failed") == 1, log[-3000:]
    assert worker.returncode == 0, log[-4000:]


@pytest.mark.parametrize("queues,expected", [("ingest", 100), (["ingest"], 100), ("training", 1),
                                             ("training,ingest", 1), (None, 1)])
def test_only_an_ingest_only_worker_keeps_its_children(queues, expected):
    """Training children run one job each (TensorFlow frees GPU memory only on exit); ingest children many."""
    from training.jobs.worker import INGEST_TASKS_PER_CHILD, _reuse_ingest_children

    conf = make_celery(Settings(data_dir=Path("/nonexistent"))).conf
    _reuse_ingest_children(conf=conf, options={"queues": queues})
    assert conf.worker_max_tasks_per_child == (INGEST_TASKS_PER_CHILD if expected == 100 else 1)
