"""The reconciler: sweeping leftovers, requeueing lost runs, re-sending lost messages and dataset ingests, killing
runs that ignore a cancel; and its command, `python -m training.jobs reconcile` (or `python -m training reconcile`)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import ROOT
from tests.training.jobs.helpers import DATASET_ID, add_dataset, worker_env
from training.data.store import DatasetStore
from training.jobs.app import INGEST_TASK_NAME, TASK_NAME, enqueue_ingest, make_celery
from training.jobs.reconciler import _kill_overdue_cancels, reconcile
from training.jobs.records import JobStore


def test_reconcile_sweeps_what_crashed_saves_and_uploads_left(settings, jobs):
    dataset_id = add_dataset(settings)
    datasets_root = DatasetStore.from_settings(settings).root
    old = [settings.model_dir / "digits" / ".staging-old", settings.model_dir / "digits" / ".deleting-old",
           datasets_root / ".staging-old"]
    recent = [settings.model_dir / "digits" / ".staging-now", datasets_root / ".staging-now"]
    for folder in old + recent:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "part").write_bytes(b"x")
    for folder in old:
        os.utime(folder, (time.time() - 7200, time.time() - 7200))

    counts = reconcile(settings, make_celery(settings))

    assert counts["swept"] == 3
    assert [folder.exists() for folder in old + recent] == [False] * 3 + [True] * 2
    assert DatasetStore.from_settings(settings).dataset(dataset_id).root.is_dir()  # a real dataset is never touched


def test_reconcile_requeues_lost_workers_and_resends_lost_messages(settings, jobs):
    app = make_celery(settings)
    stale = jobs.create("digits", DATASET_ID)
    jobs.start(stale["id"], "dead")
    lost = jobs.create("digits", DATASET_ID)
    fresh = jobs.create("digits", DATASET_ID)
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET heartbeat_at='2000-01-01 00:00:00.000000' WHERE id=?", (stale["id"],))
        conn.exec_driver_sql("UPDATE jobs SET created_at='2000-01-01 00:00:00.000000' WHERE id=?", (lost["id"],))

    counts = reconcile(settings, app, stale_after_seconds=120, lost_after_seconds=600)

    assert counts == {"requeued": 1, "given_up": 0, "resent": 1, "killed": 0, "ingests_resent": 0,
                      "swept": 0}
    assert jobs.get(stale["id"])["status"] == "queued" and jobs.get(fresh["id"])["status"] == "queued"
    sent = sorted(p.read_bytes() for p in Path(app.conf.broker_transport_options["data_folder_in"]).iterdir())
    assert len(sent) == 2
    assert any(stale["id"].encode() in body for body in sent) and any(lost["id"].encode() in body for body in sent)


def sent_tasks(app) -> list[tuple[str, list]]:
    """The (task name, arguments) of every message waiting in the embedded broker."""
    messages = [json.loads(p.read_text()) for p in Path(app.conf.broker_transport_options["data_folder_in"]).iterdir()]
    return sorted((m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages)


def test_reconcile_resends_ingests_lost_or_abandoned_by_a_dead_process(settings):
    app = make_celery(settings)
    store = DatasetStore.from_settings(settings)
    lost, waiting, abandoned, ready = (add_dataset(settings, per_class=5 + n, ingest=False) for n in range(4))
    store.ingest(ready)
    for dataset_id in (lost, abandoned):  # created long ago; the abandoned one then left mid-ingest by a dead process
        record = store.get(dataset_id)
        store._write(store.root / dataset_id, {**record, "created": "2000-01-01T00:00:00.000000+00:00"})
    store._write(store.root / abandoned, {**store.get(abandoned), "status": "ingesting"})
    enqueue_ingest(app, waiting)  # as its upload did: it waits its turn, its message is not lost

    counts = reconcile(settings, app, lost_after_seconds=600)

    assert counts["ingests_resent"] == 2 and counts["resent"] == 0
    assert sent_tasks(app) == sorted((INGEST_TASK_NAME, [d]) for d in (abandoned, lost, waiting))
    assert [store.get(d)["status"] for d in (lost, waiting, abandoned, ready)] == ["queued", "queued", "queued",
                                                                                  "ready"]
    # The queue now holds as many messages as datasets wait: nothing is sent twice on the next round.
    assert reconcile(settings, app, lost_after_seconds=600)["ingests_resent"] == 0
    assert TASK_NAME not in {name for name, _ in sent_tasks(app)}


def cancel_requested_long_ago(jobs: JobStore, job_id: str) -> None:
    jobs.request_cancel(job_id)
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET cancel_requested_at='2000-01-01 00:00:00.000000' WHERE id=?", (job_id,))


def test_reconcile_kills_a_run_that_ignores_its_cancel_past_the_grace_period(settings, jobs, monkeypatch):
    app = make_celery(settings)
    revoked = []
    monkeypatch.setattr(app.control, "revoke", lambda *args, **kwargs: revoked.append((args, kwargs)))
    ignoring, patient, working = (jobs.create("digits", DATASET_ID) for _ in range(3))
    for job in (ignoring, patient, working):
        jobs.start(job["id"], "w")  # all heartbeating: none is stale
    cancel_requested_long_ago(jobs, ignoring["id"])
    jobs.request_cancel(patient["id"])  # just now: still within its grace period

    counts = reconcile(settings, app)

    assert counts == {"requeued": 0, "given_up": 0, "resent": 0, "killed": 1, "ingests_resent": 0, "swept": 0}
    assert revoked == [((ignoring["id"],), {"terminate": True, "signal": "SIGKILL"})]
    killed = jobs.get(ignoring["id"])
    assert killed["status"] == "cancelled" and killed["finished_at"]
    assert "JOB_CANCEL_GRACE_SECONDS" in killed["error"] and "killed" in killed["error"]
    assert [jobs.get(job["id"])["status"] for job in (patient, working)] == ["running", "running"]
    assert reconcile(settings, app, cancel_grace_seconds=3600)["killed"] == 0
    assert len(revoked) == 1


def test_reconcile_leaves_the_record_of_a_run_that_stopped_by_itself_meanwhile(settings, jobs, monkeypatch):
    app = make_celery(settings)
    job = jobs.create("digits", DATASET_ID)
    jobs.start(job["id"], "w")
    cancel_requested_long_ago(jobs, job["id"])
    # Between the reconciler's look and its write, the run noticed the cancel and finished the job itself.
    monkeypatch.setattr(app.control, "revoke", lambda *a, **k: jobs.finish(job["id"], "cancelled", attempt=1))

    assert reconcile(settings, app)["killed"] == 0
    record = jobs.get(job["id"])
    assert record["status"] == "cancelled" and record["error"] is None


def test_reconcile_fences_a_kill_by_the_attempt_it_saw(settings, jobs, monkeypatch):
    app = make_celery(settings)
    job = jobs.create("digits", DATASET_ID)
    jobs.start(job["id"], "w")
    cancel_requested_long_ago(jobs, job["id"])
    seen = jobs.cancel_overdue(60)
    # The reconciler saw attempt 1; meanwhile that run was given up for lost and a second run started.
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET attempts=2 WHERE id=?", (job["id"],))
    monkeypatch.setattr(jobs, "cancel_overdue", lambda grace: seen)
    monkeypatch.setattr(app.control, "revoke", lambda *a, **k: None)

    assert _kill_overdue_cancels(jobs, app, 60) == 0
    assert jobs.get(job["id"])["status"] == "running"


def test_reconcile_with_the_broker_down_keeps_the_job_for_the_next_run(settings, jobs, monkeypatch):
    app = make_celery(settings)
    job = jobs.create("digits", DATASET_ID)
    jobs.start(job["id"], "w")
    cancel_requested_long_ago(jobs, job["id"])

    def broker_down(*args, **kwargs):
        raise ConnectionRefusedError("Error 111 connecting to redis:6379")

    monkeypatch.setattr(app.control, "revoke", broker_down)
    assert reconcile(settings, app)["killed"] == 0
    assert jobs.get(job["id"])["status"] == "running"

    monkeypatch.setattr(app.control, "revoke", lambda *a, **k: None)
    assert reconcile(settings, app)["killed"] == 1
    assert jobs.get(job["id"])["status"] == "cancelled"


def test_reconcile_really_revokes_on_the_embedded_broker(settings, jobs):
    job = jobs.create("digits", DATASET_ID)
    jobs.start(job["id"], "w")
    cancel_requested_long_ago(jobs, job["id"])
    assert reconcile(settings, make_celery(settings))["killed"] == 1


@pytest.mark.parametrize("command", [["training.jobs", "reconcile"], ["training", "reconcile"]])
def test_the_reconcile_command_runs_one_round_and_prints_its_counts(settings, jobs, command):
    stale = jobs.create("digits", DATASET_ID)
    jobs.start(stale["id"], "dead")
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET heartbeat_at='2000-01-01 00:00:00.000000' WHERE id=?", (stale["id"],))

    done = subprocess.run([sys.executable, "-m", *command, "--lost-after", "600"], cwd=ROOT,
                          env=worker_env(settings, None), capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"requeued": 1, "given_up": 0, "resent": 0, "killed": 0, "ingests_resent": 0,
                                       "swept": 0}
    assert jobs.get(stale["id"])["status"] == "queued"
