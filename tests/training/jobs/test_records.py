"""Job records (`JobStore`): every status transition and its guard, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.live import postgres_schema
from training.errors import (
    Conflict,
    IdempotencyConflictError,
    JobNotFoundError,
    NotFound,
    StoreConflictError,
    TrainingError,
)
from training.jobs.records import JobStore, UTCDateTime, create_missing, jobs
from training.progress import Progress
from training.settings import Settings

KEYS = {"id", "model", "dataset", "params", "status", "progress", "result", "error", "cancel_requested",
        "attempts", "worker", "created_at", "started_at", "finished_at", "heartbeat_at", "cancel_requested_at",
        "idempotency_key"}


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
        assert isinstance(caught.value, NotFound)  # a 404: tests/service/test_errors.py


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


def test_the_first_cancel_request_is_timed_and_asking_again_keeps_that_time(store):
    job = store.create("parts", "ds1", {})
    store.start(job["id"], "w")
    assert store.get(job["id"])["cancel_requested_at"] is None
    first = store.request_cancel(job["id"])["cancel_requested_at"]
    assert first is not None
    time.sleep(0.05)
    assert store.request_cancel(job["id"])["cancel_requested_at"] == first
    queued = store.create("parts", "ds1", {})
    assert store.request_cancel(queued["id"])["cancel_requested_at"] is not None


def test_cancel_overdue_lists_running_jobs_that_ignore_their_cancel(store):
    ignoring, obeying, untouched = (store.create("parts", "ds1", {}) for _ in range(3))
    for job in (ignoring, obeying, untouched):
        store.start(job["id"], "w")
    store.request_cancel(ignoring["id"])
    store.request_cancel(obeying["id"])
    store.finish(obeying["id"], "cancelled", attempt=1)
    assert store.cancel_overdue(60) == []
    time.sleep(0.2)
    assert [job["id"] for job in store.cancel_overdue(0.1)] == [ignoring["id"]]


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


def test_recent_is_newest_first_limited_and_filtered(store):
    ids = [store.create("parts", f"ds{i}", {})["id"] for i in range(4)]
    store.start(ids[1], "w")
    store.request_cancel(ids[2])
    assert [j["id"] for j in store.recent()] == ids[::-1]
    assert [j["id"] for j in store.recent(limit=2)] == ids[:1:-1]
    assert [j["id"] for j in store.recent(status="queued")] == [ids[3], ids[0]]
    assert [j["id"] for j in store.recent(status="running")] == [ids[1]]
    assert store.recent(status="succeeded") == []
    assert json.loads(json.dumps(store.recent())) == store.recent()
    with pytest.raises(ValueError, match="status"):
        store.recent(status="done")


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


def test_an_idempotency_key_records_one_job(store):
    first = store.create("parts", "ds1", {"epochs": 3}, idempotency_key="order-17")
    assert first["idempotency_key"] == "order-17" and first["status"] == "queued"
    assert store.create("parts", "ds1", {"epochs": 3}, idempotency_key="order-17") == first
    other = store.create("parts", "ds1", {"epochs": 3}, idempotency_key="order-18")
    assert other["id"] != first["id"]
    plain = [store.create("parts", "ds1", {"epochs": 3}) for _ in range(2)]  # no key: never deduplicated
    assert plain[0]["id"] != plain[1]["id"] and plain[0]["idempotency_key"] is None
    assert len(store.recent()) == 4


@pytest.mark.parametrize(("model", "dataset", "params", "named"), [
    ("other", "ds1", {"epochs": 3}, "model 'other'"),
    ("parts", "ds2", {"epochs": 3}, "dataset 'ds2'"),
    ("parts", "ds1", {"epochs": 4}, "params {'epochs': 4}"),
])
def test_an_idempotency_key_reused_for_another_job_is_a_conflict(store, model, dataset, params, named):
    first = store.create("parts", "ds1", {"epochs": 3}, idempotency_key="k1")
    with pytest.raises(IdempotencyConflictError) as caught:
        store.create(model, dataset, params, idempotency_key="k1")
    assert isinstance(caught.value, StoreConflictError) and isinstance(caught.value, Conflict)  # a 409
    assert first["id"] in caught.value.message and f"received: {named}" in caught.value.message
    assert len(store.recent()) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there", "new\nline", 17])
def test_bad_idempotency_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="Idempotency-Key must be 1-255 printable ASCII characters, received: "):
        store.create("parts", "ds1", {}, idempotency_key=key)
    assert store.recent() == []


def test_threads_racing_with_one_idempotency_key_record_one_job(store):
    barrier = threading.Barrier(8)

    def create(_: int) -> str:
        barrier.wait()
        return store.create("parts", "ds1", {"epochs": 3}, idempotency_key="retry-me")["id"]

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(create, range(8)))
    assert len(ids) == 1 and [job["id"] for job in store.recent()] == list(ids)


def test_the_unique_index_holds_even_without_the_lookup_first(store):
    store.create("parts", "ds1", {}, idempotency_key="k")
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(jobs.insert().values(id="f" * 32, model="parts", dataset="ds1", params={}, status="queued",
                                          cancel_requested=False, attempts=0, created_at=datetime.now(UTC),
                                          idempotency_key="k"))


# --- upgrading a job table made by an earlier version ------------------------------------------------------------


def _make_first_release_table(url: str) -> tuple[str, str]:
    """Create the jobs table as the first release did (without the newer columns), with a running job whose
    cancel was requested and a queued one; return their ids."""
    old = sa.MetaData()
    table = sa.Table(
        "jobs", old,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("worker", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("heartbeat_at", UTCDateTime, nullable=True),
        sa.Index("ix_jobs_status_created_at", "status", "created_at"),
    )
    engine = sa.create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(table.insert(), [
            {"id": "a" * 32, "model": "parts", "dataset": "ds1", "params": {"epochs": 3}, "status": "running",
             "cancel_requested": True, "attempts": 1, "worker": "w", "created_at": now, "started_at": now,
             "heartbeat_at": now},
            {"id": "b" * 32, "model": "parts", "dataset": "ds1", "params": {}, "status": "queued",
             "cancel_requested": False, "attempts": 0, "worker": None, "created_at": now, "started_at": None,
             "heartbeat_at": None},
        ])
    engine.dispose()
    return "a" * 32, "b" * 32


def _open_in_process(url: str, barrier, results) -> None:
    """Open (and so upgrade) the store in a fresh process at the same moment as the others (spawn target)."""
    barrier.wait()
    try:
        JobStore(url).close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.fixture(params=["sqlite", "postgres"])
def old_store_url(request, tmp_path):
    """The URL of an empty database (a fresh SQLite file, or a fresh PostgreSQL schema) for an old table."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.sqlite3'}"
        return
    with postgres_schema("jobs_upgrade") as url:
        yield url


def test_a_first_release_table_is_upgraded_by_processes_opening_it_at_once(old_store_url):
    running, queued = _make_first_release_table(old_store_url)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_open_in_process, args=(old_store_url, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok"] * 4

    store = JobStore(old_store_url)  # a fifth open finds nothing left to do
    try:
        inspector = sa.inspect(store.engine)
        assert {"cancel_requested_at", "idempotency_key"} <= {c["name"] for c in inspector.get_columns("jobs")}
        assert any(index["name"] == "ix_jobs_idempotency_key" and index["unique"]
                   for index in inspector.get_indexes("jobs"))
        old_running, old_queued = store.get(running), store.get(queued)
        assert set(old_running) == KEYS and old_running["params"] == {"epochs": 3}
        # A cancel asked for before the upgrade gets its grace period from the upgrade on.
        assert old_running["cancel_requested_at"] is not None and old_queued["cancel_requested_at"] is None
        assert old_queued["idempotency_key"] is None
        assert store.start(queued, "w2")["status"] == "running"
        keyed = store.create("parts", "ds1", {}, idempotency_key="k")
        assert store.create("parts", "ds1", {}, idempotency_key="k") == keyed
        with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == queued).values(idempotency_key="k"))
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_many_engines_creating_a_schema_at_once_all_succeed(backend, tmp_path):
    # The registry's schema (two tables, one index): a racer can lose on each object in turn, which a
    # single retry did not survive (CI saw "table model_versions already exists" on the retry).
    from training.registry import metadata as registry_schema

    for round_ in range(5):
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(postgres_schema(f"create_race{round_}")) if backend == "postgres" else \
                f"sqlite:///{tmp_path / f'race{round_}.sqlite3'}"
            engines = [JobStore._make_engine(url) for _ in range(8)]
            for engine in engines:
                stack.callback(engine.dispose)
            barrier = threading.Barrier(len(engines))

            def create(engine, barrier=barrier):
                barrier.wait()
                create_missing(registry_schema, engine)

            with ThreadPoolExecutor(len(engines)) as pool:
                list(pool.map(create, engines))  # raises what any racer raised
            inspector = sa.inspect(engines[0])
            assert {"model_names", "model_versions"} <= set(inspector.get_table_names())
            assert [index["name"] for index in inspector.get_indexes("model_versions")] == ["ix_model_versions_state"]


def test_creating_a_schema_on_a_database_that_is_down_fails_at_once():
    engine = JobStore._make_engine("postgresql+psycopg://nobody:x@127.0.0.1:1/none")
    connects = []
    sa.event.listen(engine, "do_connect", lambda *args: connects.append(1))
    schema = sa.MetaData()
    for name in ("a", "b", "c"):  # four tries allowed against racers; a down database gets no retries
        sa.Table(name, schema, sa.Column("id", sa.Integer, primary_key=True))
    try:
        with pytest.raises(sa.exc.OperationalError):
            create_missing(schema, engine)
        assert len(connects) == 2  # the create, then the probe that tells a lost race from no database
    finally:
        engine.dispose()
