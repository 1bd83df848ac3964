"""Training jobs through Celery: `run_job` without a broker, then real workers on Redis and on the filesystem broker."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from training.datasets import DatasetStore
from training.demo import write_digits_dataset
from training.jobs import JobStore
from training.settings import Settings
from training.store import ModelStore
from training.tasks import QUEUE, TASK_NAME, enqueue, make_celery, reconcile, run_job

REDIS_URL = "redis://127.0.0.1:6379/15"
DATASET_ID = "0123456789abcdef"
PARAMS = {"image_size": 32, "epochs": 3}
ROOT = Path(__file__).resolve().parents[2]


def add_dataset(settings: Settings) -> str:
    """Put a small digits dataset where `DatasetStore.path` finds it; return its id."""
    write_digits_dataset(settings.datasets_dir / DATASET_ID / "data", image_size=32, per_class=8, classes=3)
    return DATASET_ID


@pytest.fixture
def jobs(settings):
    store = JobStore.from_settings(settings)
    yield store
    store.close()


def test_run_job_records_version_and_metrics_once(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "succeeded" and done["error"] is None, done
    assert done["result"]["version"] == 1 and done["result"]["published"] is True
    assert set(done["result"]["metrics"]) == {"accuracy", "top_k_accuracy", "loss"}
    assert done["progress"]["phase"] == "save" and done["worker"] == "test"
    store = ModelStore(settings.model_dir)
    assert store.versions("digits") == [1]
    assert store.metadata("digits", 1)["job"] == job["id"]
    # A redelivered message does nothing.
    assert run_job(job["id"], settings, "again") is None
    assert store.versions("digits") == [1]
    assert jobs.get(job["id"])["worker"] == "test"


def test_rerun_after_crash_reuses_the_saved_version(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    run_job(job["id"], settings, "first")
    # As if the worker died after saving but before recording: the job is back in the queue.
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET status='queued', result=NULL WHERE id=?", (job["id"],))

    done = run_job(job["id"], settings, "second")

    assert done["status"] == "succeeded" and done["result"]["version"] == 1
    assert ModelStore(settings.model_dir).versions("digits") == [1]


def write_head(folder):
    (folder / "head.keras").write_bytes(b"weights")


@pytest.mark.parametrize(("policy", "published_before", "published"), [
    ("auto", None, True),     # nothing published yet
    ("auto", 0.9, False),     # the published version is better
    ("auto", 0.4, True),      # as good or better than the published one
    ("always", 0.9, True),
    ("never", None, False),
])
def test_rerun_after_a_crash_between_rename_and_publish_applies_the_publish_policy(
        settings, jobs, policy, published_before, published):
    store = ModelStore(settings.model_dir)
    if published_before is not None:
        store.save_version("digits", write_head, {"metrics": {"accuracy": published_before}}, ["a", "b"], "always")
    job = jobs.create("digits", DATASET_ID, {**PARAMS, "publish": policy})
    # As if the first run renamed its version into place and died before publishing it.
    version, _ = store.save_version("digits", write_head, {"job": job["id"], "metrics": {"accuracy": 0.5}},
                                    ["a", "b"], "never")

    done = run_job(job["id"], settings, "second")

    assert done["status"] == "succeeded" and done["result"]["version"] == version
    assert done["result"]["published"] is published
    assert (store.published_version("digits") == version) is published
    assert store.versions("digits") == list(range(1, version + 1))  # no second version trained


def test_rerun_keeps_an_already_published_version_published(settings, jobs):
    store = ModelStore(settings.model_dir)
    job = jobs.create("digits", DATASET_ID, {**PARAMS, "publish": "never"})
    store.save_version("digits", write_head, {"job": job["id"], "metrics": {"accuracy": 0.5}}, ["a"], "always")

    done = run_job(job["id"], settings, "second")

    assert done["result"] == {"version": 1, "published": True,
                              "metrics": {"accuracy": 0.5, "top_k_accuracy": None, "loss": None}}
    assert store.published_version("digits") == 1


def test_cancel_before_start_runs_nothing(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    jobs.request_cancel(job["id"])

    assert run_job(job["id"], settings, "test") is None
    assert jobs.get(job["id"])["status"] == "cancelled"
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_cancel_while_running_stops_without_a_version(settings, jobs, monkeypatch):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    heartbeat = JobStore.heartbeat

    def heartbeat_then_cancel(self, job_id, progress=None, attempt=None):
        alive = heartbeat(self, job_id, progress, attempt=attempt)
        if progress and progress["phase"] == "head":
            self.request_cancel(job_id)
        return alive

    monkeypatch.setattr(JobStore, "heartbeat", heartbeat_then_cancel)
    done = run_job(job["id"], settings, "test", cancel_poll_seconds=0)

    assert done["status"] == "cancelled" and done["result"] is None
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_a_frozen_run_that_wakes_after_being_requeued_saves_nothing(settings, jobs, monkeypatch):
    """A worker frozen past JOB_STALE_SECONDS (not dead) is requeued; when it wakes it must step aside."""
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    heartbeat = JobStore.heartbeat

    def heartbeat_then_lose_the_job(self, job_id, progress=None, attempt=None):
        alive = heartbeat(self, job_id, progress, attempt=attempt)
        if progress and progress["phase"] == "head" and attempt == 1:
            # Meanwhile the reconciler gave this run up and a second worker started the job.
            self.requeue(job_id)
            self.start(job_id, "second")
        return alive

    monkeypatch.setattr(JobStore, "heartbeat", heartbeat_then_lose_the_job)
    assert run_job(job["id"], settings, "frozen", cancel_poll_seconds=0) is None

    record = jobs.get(job["id"])
    assert record["status"] == "running" and record["worker"] == "second" and record["attempts"] == 2
    assert ModelStore(settings.model_dir).versions("digits") == []


@pytest.mark.parametrize(("dataset", "params", "message"), [
    ("ffffffffffffffff", PARAMS, "no dataset with id 'ffffffffffffffff'"),
    ("../etc", PARAMS, "dataset_id must be 16 lowercase hex characters"),
    (DATASET_ID, {"epochs": "many"}, "epochs must be a int, received: 'many'"),
    (DATASET_ID, {"colour": 1}, "unknown training option(s): colour"),
])
def test_bad_dataset_or_params_fail_with_a_clear_error(settings, jobs, dataset, params, message):
    add_dataset(settings)
    job = jobs.create("digits", dataset, params)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "failed" and message in done["error"], done["error"]
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_unexpected_crash_is_recorded_not_raised(settings, jobs, monkeypatch):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    monkeypatch.setattr("training.pipeline.train", lambda *a, **k: 1 / 0)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "failed" and done["error"] == "internal error: ZeroDivisionError: division by zero"


def test_make_celery_settings(settings):
    app = make_celery(dataclasses.replace(settings, celery_broker_url=REDIS_URL))
    conf = app.conf
    assert conf.broker_url == REDIS_URL and conf.task_ignore_result and conf.task_acks_late
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.task_reject_on_worker_lost and conf.worker_concurrency == 1
    assert conf.task_default_queue == QUEUE and conf.task_routes[TASK_NAME] == {"queue": QUEUE}
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit

    embedded = make_celery(settings).conf
    assert embedded.broker_url == "filesystem://"
    assert Path(embedded.broker_transport_options["data_folder_in"]).is_dir()


def test_importing_tasks_does_not_import_tensorflow():
    code = "import sys, training.tasks; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


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
    assert DatasetStore.from_settings(settings).path(dataset_id).is_dir()  # a real dataset is never touched


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

    assert counts == {"requeued": 1, "given_up": 0, "resent": 1, "killed": 0, "swept": 0}
    assert jobs.get(stale["id"])["status"] == "queued" and jobs.get(fresh["id"])["status"] == "queued"
    sent = sorted(p.read_bytes() for p in Path(app.conf.broker_transport_options["data_folder_in"]).iterdir())
    assert len(sent) == 2
    assert any(stale["id"].encode() in body for body in sent) and any(lost["id"].encode() in body for body in sent)


def test_enqueue_sends_the_job_id_as_the_task_id(settings):
    app = make_celery(settings)
    enqueue(app, "0123456789abcdef0123456789abcdef")
    (message,) = Path(app.conf.broker_transport_options["data_folder_in"]).iterdir()
    headers = json.loads(message.read_text())["headers"]
    assert headers["id"] == "0123456789abcdef0123456789abcdef" and headers["task"] == TASK_NAME


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

    assert counts == {"requeued": 0, "given_up": 0, "resent": 0, "killed": 1, "swept": 0}
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

    from training.tasks import _kill_overdue_cancels

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


# --- real workers -------------------------------------------------------------------------------


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
DEAF_WORKER = ("import sys, training.tasks as tasks; from celery.__main__ import main; "
               "tasks._Throttled.__call__ = lambda self: False; sys.argv[0] = 'celery'; sys.exit(main())")


def start_worker(settings: Settings, broker_url: str | None, log_file: Path, *, deaf: bool = False) -> subprocess.Popen:
    celery = [sys.executable, "-c", DEAF_WORKER] if deaf else [str(Path(sys.executable).with_name("celery"))]
    command = [*celery, "-A", "training.tasks", "worker", "-Q", QUEUE, "--concurrency", "1", "--pool", "prefork",
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


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer (CI starts one; run redis-server locally): {exc}",
                    pytrace=False)
    finally:
        client.close()
    return REDIS_URL


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
    write_digits_dataset(settings.datasets_dir / DATASET_ID / "data", image_size=32, per_class=40, classes=10)
    store = JobStore.from_settings(settings)
    app = make_celery(settings)
    job = store.create("digits", DATASET_ID, {"image_size": 32, "epochs": 200, "patience": 200})
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
    write_digits_dataset(settings.datasets_dir / DATASET_ID / "data", image_size=32, per_class=40, classes=10)
    jobs = JobStore.from_settings(settings)
    app = make_celery(settings)
    job = jobs.create("digits", DATASET_ID, {"image_size": 32, "epochs": 500, "patience": 500})
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
        next_job = jobs.create("digits", DATASET_ID, PARAMS)
        enqueue(app, next_job["id"])
        (done,) = wait_until_final(jobs, [next_job["id"]], worker, log_file, timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert jobs.get(job["id"])["status"] == "cancelled" and jobs.get(job["id"])["attempts"] == 1
        assert ModelStore(settings.model_dir).versions("digits") == [1]
    finally:
        stop_worker(worker)
        jobs.close()
