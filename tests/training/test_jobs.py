"""Job store: every status transition and its guard, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests.live import postgres_schema
from training.errors import TrainingError
from training.jobs import JobNotFoundError, JobStore, jobs
from training.progress import Progress
from training.settings import Settings

KEYS = {"id", "model", "dataset", "params", "status", "progress", "result", "error", "cancel_requested",
        "attempts", "worker", "created_at", "started_at", "finished_at", "heartbeat_at"}


@pytest.fixture(scope="session")
def postgres_url():
    """A URL whose connections use a fresh schema, dropped after the session, so reruns start clean."""
    with postgres_schema("jobs_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """The URL of an empty job store on each backend (SQLite in a file, so processes can share it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    url = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if sa.inspect(conn).has_table("jobs"):
            conn.execute(jobs.delete())
    engine.dispose()
    return url


@pytest.fixture
def store(store_url):
    """An empty job store with the default three attempts."""
    job_store = JobStore(store_url)
    yield job_store
    job_store.close()


def test_create_returns_a_queued_json_able_record(store):
    job = store.create("parts", "ds1", {"epochs": 3, "optimizer": "adam"})
    assert set(job) == KEYS
    assert len(job["id"]) == 32 and job["status"] == "queued"
    assert job["params"] == {"epochs": 3, "optimizer": "adam"}
    assert (job["attempts"], job["cancel_requested"], job["progress"], job["result"]) == (0, False, None, None)
    assert datetime.fromisoformat(job["created_at"]).utcoffset().total_seconds() == 0
    assert json.loads(json.dumps(job)) == job
    assert store.get(job["id"]) == job


def test_create_refuses_params_that_are_not_json(store):
    with pytest.raises(TrainingError, match="JSON-able"):
        store.create("parts", "ds1", {"when": object()})


def test_unknown_job_is_a_404(store):
    for call in (store.get, store.request_cancel, store.cancel_requested, lambda i: store.start(i, "w"),
                 lambda i: store.finish(i, "failed")):
        with pytest.raises(JobNotFoundError) as caught:
            call("0" * 32)
        assert caught.value.status == 404


def test_start_takes_a_queued_job_once(store):
    job = store.create("parts", "ds1", {})
    started = store.start(job["id"], "host-a:1")
    assert started["status"] == "running" and started["worker"] == "host-a:1" and started["attempts"] == 1
    assert started["started_at"] and started["heartbeat_at"]
    # A redelivered message finds the job taken and does nothing.
    assert store.start(job["id"], "host-b:2") is None
    assert store.get(job["id"])["worker"] == "host-a:1"


def test_heartbeat_stores_progress_only_while_running(store):
    job = store.create("parts", "ds1", {})
    assert store.heartbeat(job["id"], {"phase": "head"}) is False
    store.start(job["id"], "w")
    before = store.get(job["id"])["heartbeat_at"]
    progress = Progress("head", 3, 50, epoch=3, metrics={"loss": 0.5, "val_accuracy": 0.9}).as_dict()
    assert store.heartbeat(job["id"], progress) is True
    after = store.get(job["id"])
    assert after["progress"] == progress and after["heartbeat_at"] > before
    store.finish(job["id"], "succeeded")
    assert store.heartbeat(job["id"], {"phase": "save"}) is False
    assert store.get(job["id"])["progress"] == progress


def test_finish_records_result_and_never_overwrites_a_final_state(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    result = {"version": 2, "published": True, "metrics": {"val_accuracy": 0.97}}
    done = store.finish(job["id"], "succeeded", result=result)
    assert done["status"] == "succeeded" and done["result"] == result and done["finished_at"]
    assert store.finish(job["id"], "failed", error="late") is None
    assert store.get(job["id"]) == done
    assert store.start(job["id"], "w2") is None


def test_finish_a_queued_job_and_refuse_a_non_final_status(store):
    job = store.create("parts", "ds1", {})
    assert store.finish(job["id"], "failed", error="dataset vanished")["error"] == "dataset vanished"
    with pytest.raises(ValueError, match="status"):
        store.finish(job["id"], "running")


def test_cancel_a_queued_job_is_immediate_and_final(store):
    job = store.create("parts", "ds1", {})
    cancelled = store.request_cancel(job["id"])
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert store.cancel_requested(job["id"]) is True
    assert store.start(job["id"], "w") is None
    assert store.finish(job["id"], "succeeded", result={"version": 1}) is None
    assert store.get(job["id"])["status"] == "cancelled"


def test_cancel_a_running_job_asks_it_to_stop(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    assert store.cancel_requested(job["id"]) is False
    asked = store.request_cancel(job["id"])
    assert asked["status"] == "running" and asked["cancel_requested"] is True
    assert store.cancel_requested(job["id"]) is True
    assert store.finish(job["id"], "cancelled")["status"] == "cancelled"


def test_cancel_a_finished_job_changes_nothing(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    done = store.finish(job["id"], "succeeded", result={"version": 1})
    assert store.request_cancel(job["id"]) == done
    assert store.cancel_requested(job["id"]) is False


def test_stale_running_and_requeue_until_max_attempts(store):
    job = store.create("parts", "ds1", {})
    fresh = store.create("parts", "ds2", {})
    store.start(fresh["id"], "alive")
    for attempt in (1, 2, 3):
        assert store.start(job["id"], f"w{attempt}")["attempts"] == attempt
        time.sleep(0.2)
        assert [j["id"] for j in store.stale_running(60)] == []
        # The live worker reports now; the lost one last did 0.2 s ago.
        store.heartbeat(fresh["id"], {"phase": "head"})
        assert [j["id"] for j in store.stale_running(0.1)] == [job["id"]]
        requeued = store.requeue(job["id"])
        assert requeued is (attempt < 3)
    failed = store.get(job["id"])
    assert failed["status"] == "failed" and failed["error"] == "worker lost 3 times" and failed["finished_at"]
    assert store.requeue(job["id"]) is False
    assert store.get(fresh["id"])["status"] == "running"


def test_a_run_given_up_for_lost_is_fenced_off(store):
    job = store.create("parts", "ds1", {})
    assert store.start(job["id"], "frozen")["attempts"] == 1
    assert store.requeue(job["id"]) is True
    # Requeued but not started again: the first run must stop, and cannot finish or cancel the job.
    assert store.cancel_requested(job["id"], attempt=1) is True
    assert store.heartbeat(job["id"], {"phase": "head"}, attempt=1) is False
    assert store.finish(job["id"], "cancelled", attempt=1) is None
    assert store.get(job["id"])["status"] == "queued"

    assert store.start(job["id"], "second")["attempts"] == 2
    assert store.cancel_requested(job["id"], attempt=1) is True
    assert store.cancel_requested(job["id"], attempt=2) is False
    assert store.heartbeat(job["id"], {"phase": "old"}, attempt=1) is False
    assert store.finish(job["id"], "succeeded", result={"version": 9}, attempt=1) is None
    assert store.heartbeat(job["id"], {"phase": "head"}, attempt=2) is True
    done = store.finish(job["id"], "succeeded", result={"version": 1}, attempt=2)
    assert done["status"] == "succeeded" and done["result"] == {"version": 1} and done["progress"]["phase"] == "head"


def test_requeue_leaves_a_job_that_heartbeated_since(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    assert store.requeue(job["id"], older_than_seconds=60) is False
    assert store.get(job["id"])["status"] == "running"
    requeued = store.requeue(job["id"], older_than_seconds=0)
    assert requeued is True and store.get(job["id"])["status"] == "queued"
    assert store.get(job["id"])["worker"] is None


def test_requeue_cancels_a_lost_job_whose_cancel_was_requested(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    store.request_cancel(job["id"])
    assert store.requeue(job["id"]) is False
    assert store.get(job["id"])["status"] == "cancelled"


def test_requeue_only_touches_running_jobs(store):
    job = store.create("parts", "ds1", {})
    assert store.requeue(job["id"]) is False
    assert store.get(job["id"])["status"] == "queued"


def test_max_attempts_is_a_constructor_argument(store_url):
    one = JobStore(store_url, max_attempts=1)
    job = one.create("parts", "ds1", {})
    one.start(job["id"], "w")
    assert one.requeue(job["id"]) is False
    assert one.get(job["id"])["error"] == "worker lost 1 times"
    one.close()
    with pytest.raises(ValueError, match="max_attempts"):
        JobStore(store_url, max_attempts=0)


def test_list_is_newest_first_limited_and_filtered(store):
    ids = [store.create("parts", f"ds{i}", {})["id"] for i in range(4)]
    store.start(ids[1], "w")
    store.request_cancel(ids[2])
    assert [j["id"] for j in store.list()] == ids[::-1]
    assert [j["id"] for j in store.list(limit=2)] == ids[:1:-1]
    assert [j["id"] for j in store.list(status="queued")] == [ids[3], ids[0]]
    assert [j["id"] for j in store.list(status="running")] == [ids[1]]
    assert store.list(status="succeeded") == []
    assert json.loads(json.dumps(store.list())) == store.list()
    with pytest.raises(ValueError, match="status"):
        store.list(status="done")


def test_opening_twice_keeps_the_records(store_url):
    first = JobStore(store_url)
    job = first.create("parts", "ds1", {})
    second = JobStore(store_url)
    assert second.get(job["id"]) == job
    first.close()
    second.close()


def test_from_settings_defaults_to_sqlite_in_wal_mode(tmp_path):
    settings = Settings(data_dir=tmp_path / "new" / "data")
    store = JobStore.from_settings(settings)
    assert (tmp_path / "new" / "data" / "jobs.sqlite3").is_file()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    store.close()


def test_from_settings_uses_database_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"
    store = JobStore.from_settings(Settings(data_dir=tmp_path / "data", database_url=url))
    store.create("parts", "ds1", {})
    assert (tmp_path / "elsewhere.sqlite3").is_file() and not (tmp_path / "data").exists()
    store.close()


def test_threads_racing_to_start_one_job_let_exactly_one_win(store):
    job = store.create("parts", "ds1", {})
    barrier = threading.Barrier(8)

    def take(i: int) -> bool:
        barrier.wait()
        return store.start(job["id"], f"thread-{i}") is not None

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(take, range(8)))
    assert wins.count(True) == 1
    assert store.get(job["id"])["attempts"] == 1
    assert store.get(job["id"])["worker"] == f"thread-{wins.index(True)}"


def _start_in_process(url: str, job_id: str, index: int, barrier, results) -> None:
    """Open the store in a fresh process and try to take the job (spawn target, so module level)."""
    store = JobStore(url)
    barrier.wait()
    results.put((index, store.start(job_id, f"process-{index}") is not None))
    store.close()


def test_processes_racing_to_start_one_job_let_exactly_one_win(store, store_url):
    job = store.create("parts", "ds1", {})
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_start_in_process, args=(store_url, job["id"], i, barrier, results))
                 for i in range(4)]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    winners = [i for i, won in outcomes.items() if won]
    assert len(winners) == 1
    final = store.get(job["id"])
    assert final["attempts"] == 1 and final["worker"] == f"process-{winners[0]}"
