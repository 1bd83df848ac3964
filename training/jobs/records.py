"""Durable training-job records shared by the API process and the training workers.

A job moves `queued -> running -> succeeded | failed | cancelled` (or `queued -> cancelled`).
Every transition is one guarded `UPDATE ... WHERE status IN (...)`, so two processes racing
(a redelivered Celery message, a reconciler and a late worker) cannot both start a job or
overwrite a final state: the database decides, and the loser sees that it lost.

SQLite (the default, under `DATA_DIR`) runs in WAL mode with a busy timeout so several
processes on one machine can share it; `DATABASE_URL` points it at PostgreSQL instead.
A table made by an earlier version gains the newer columns when a store opens it (`UPGRADE_COLUMNS`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from training.errors import IdempotencyConflictError, InvalidInput, JobNotFoundError, TrainingError
from training.settings import Settings

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE_STATUSES = (QUEUED, RUNNING)
# How long a SQLite writer waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
# An Idempotency-Key: 1 to 255 printable ASCII characters (the column's width).
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite keeps no zone, so add it back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Store the value in UTC; naive values are refused rather than guessed."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware, received: {value!r}")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text, so every value must be written in the same zone, without it.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Return the value as an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()
jobs = sa.Table(
    "jobs",
    metadata,
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
    # Added after the first release: `JobStore` adds them to an older table (UPGRADE_COLUMNS).
    sa.Column("cancel_requested_at", UTCDateTime, nullable=True),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Index("ix_jobs_status_created_at", "status", "created_at"),
    # Unique, so two requests with one key cannot both record a job (NULLs, no key, never collide).
    sa.Index("ix_jobs_idempotency_key", "idempotency_key", unique=True),
)

TIMESTAMPS = ("created_at", "started_at", "finished_at", "heartbeat_at", "cancel_requested_at")
# Columns added since the first release: a table made before them gets them with ALTER TABLE.
# SQLite cannot add a UNIQUE column, so the key's uniqueness comes from an index made afterwards.
UPGRADE_COLUMNS = ("cancel_requested_at", "idempotency_key")
UPGRADE_INDEXES = {"ix_jobs_idempotency_key":
                   "CREATE UNIQUE INDEX IF NOT EXISTS ix_jobs_idempotency_key ON jobs (idempotency_key)"}


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Turn on WAL (readers never block the writer) and wait for locks instead of failing."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def check_idempotency_key(key: str) -> str:
    """Check an idempotency key: 1 to 255 printable ASCII characters."""
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_PATTERN.match(key):
        shown = repr(key) if not isinstance(key, str) or len(key) <= 64 else f"{key[:64]!r}... ({len(key)} characters)"
        raise InvalidInput(f"Idempotency-Key must be 1-255 printable ASCII characters, received: {shown}")
    return key


def _same_request(job: dict, model: str, dataset: str, params: dict) -> dict:
    """Return the job recorded under an idempotency key if it was asked for the same training, else refuse."""
    asked = {"model": model, "dataset": dataset, "params": params}
    differs = [name for name, value in asked.items() if job[name] != value]
    if differs:
        def show(values: dict) -> str:
            return ", ".join(f"{name} {values[name]!r}" for name in differs)

        raise IdempotencyConflictError(
            f"this Idempotency-Key was used for job {job['id']} with {show(job)}; a different job needs a new "
            f"key, received: {show(asked)}")
    return job


def _as_dict(row: sa.Row) -> dict:
    """Return a job row as a JSON-able dict (ISO 8601 timestamps)."""
    record = dict(row._mapping)
    for name in TIMESTAMPS:
        if record[name] is not None:
            record[name] = record[name].isoformat()
    record["cancel_requested"] = bool(record["cancel_requested"])
    return record


def create_missing(schema: sa.MetaData, engine: Engine) -> None:
    """Create the tables and indexes of `schema` that are missing, safe against other processes doing the same.

    Processes starting at once can all see a table missing and all create it; each loser fails on the one
    object someone else made between its check and its create. A failure therefore means one more object
    exists, so after one try per object plus one, every checked create finds them all made: a failure
    past that is real and is raised. A database that is down is raised at once, not retried.
    """
    tries = len(schema.tables) + sum(len(table.indexes) for table in schema.tables.values()) + 1
    for attempt in range(tries):
        try:
            schema.create_all(engine)
            return
        except sa.exc.DBAPIError:
            if attempt == tries - 1:
                raise
            with engine.connect():  # lost a race, or cannot connect: the latter raises here
                pass


class JobStore:
    """Training-job records in one SQL table, every status change guarded in SQL."""

    def __init__(self, url: str, *, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, received: {max_attempts}")
        self.max_attempts = max_attempts
        self.engine = self._make_engine(url)
        self._create_table()

    @classmethod
    def from_settings(cls, settings: Settings, *, max_attempts: int = 3) -> JobStore:
        """Open the store at `DATABASE_URL`, or SQLite under `DATA_DIR` when it is unset."""
        if settings.database_url:
            return cls(settings.database_url, max_attempts=max_attempts)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{settings.data_dir / 'jobs.sqlite3'}", max_attempts=max_attempts)

    @staticmethod
    def _make_engine(url: str) -> Engine:
        """Build the engine, with SQLite set up for several processes."""
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            sa.event.listen(engine, "connect", _set_sqlite_pragmas)
            return engine
        # Workers hold the store for hours; a database restart must not leave them with dead connections.
        return sa.create_engine(parsed, pool_pre_ping=True)

    def _create_table(self) -> None:
        """Create the table if it is missing, and upgrade one made by an earlier version."""
        create_missing(metadata, self.engine)
        self._upgrade_table()

    def _missing(self) -> tuple[list[str], list[str]]:
        """The upgrade columns and indexes the table lacks."""
        inspector = sa.inspect(self.engine)
        columns = {column["name"] for column in inspector.get_columns("jobs")}
        indexes = {index["name"] for index in inspector.get_indexes("jobs")}
        return [name for name in UPGRADE_COLUMNS if name not in columns], \
            [name for name in UPGRADE_INDEXES if name not in indexes]

    def _upgrade_table(self) -> None:
        """Add the columns and indexes newer than the table; idempotent, and safe when processes race."""
        columns, indexes = self._missing()
        for name in columns:
            column_type = jobs.c[name].type.compile(dialect=self.engine.dialect)
            self._run_upgrade(f"ALTER TABLE jobs ADD COLUMN {name} {column_type}",
                              lambda name=name: name in self._missing()[0])
        if "cancel_requested_at" in columns:
            with self.engine.begin() as conn:
                # A cancel asked for before the upgrade has no time recorded: its grace period starts now.
                conn.execute(jobs.update().where(jobs.c.status == RUNNING, jobs.c.cancel_requested.is_(True),
                                                 jobs.c.cancel_requested_at.is_(None))
                             .values(cancel_requested_at=utcnow()))
        for name in indexes:
            self._run_upgrade(UPGRADE_INDEXES[name], lambda name=name: name in self._missing()[1])

    def _run_upgrade(self, ddl: str, still_missing: Callable[[], bool]) -> None:
        """Run one upgrade statement; a failure is fine when another process made the same change first."""
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(ddl)
        except sa.exc.DBAPIError:
            if still_missing():
                raise

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def _fetch(self, conn: Connection, job_id: str) -> dict:
        """Read one job in the caller's transaction."""
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return _as_dict(row)

    def create(self, model: str, dataset: str, params: dict | None = None,
               idempotency_key: str | None = None) -> dict:
        """Record a new queued job and return it; with a key already used, return that key's job instead.

        A key's job must have the same model, dataset and params, or IdempotencyConflictError (409) is raised.
        """
        params = dict(params or {})
        try:
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"job params must be JSON-able, received: {params!r} ({exc})") from None
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            existing = self._by_key(idempotency_key)
            if existing is not None:
                return _same_request(existing, model, dataset, params)
        job_id = uuid.uuid4().hex
        try:
            with self.engine.begin() as conn:
                conn.execute(jobs.insert().values(
                    id=job_id, model=model, dataset=dataset, params=params, status=QUEUED,
                    cancel_requested=False, attempts=0, created_at=utcnow(), idempotency_key=idempotency_key,
                ))
                return self._fetch(conn, job_id)
        except sa.exc.IntegrityError:
            # A concurrent request with the same key recorded its job first (the unique index): return the winner's.
            existing = None if idempotency_key is None else self._by_key(idempotency_key)
            if existing is None:
                raise
            return _same_request(existing, model, dataset, params)

    def _by_key(self, idempotency_key: str) -> dict | None:
        """The job recorded with this idempotency key, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.idempotency_key == idempotency_key)).first()
        return None if row is None else _as_dict(row)

    def get(self, job_id: str) -> dict:
        """Return one job, or raise `JobNotFoundError`."""
        with self.engine.connect() as conn:
            return self._fetch(conn, job_id)

    def recent(self, limit: int = 100, status: str | None = None) -> list[dict]:
        """Return up to `limit` jobs, newest first, optionally only those with `status`."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, received: {status!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, received: {limit}")
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(jobs.c.status == status)
        with self.engine.connect() as conn:
            return [_as_dict(row) for row in conn.execute(query).all()]

    def start(self, job_id: str, worker: str) -> dict | None:
        """Move a queued job to running for `worker`; None when it is not queued (already taken, final)."""
        now = utcnow()
        with self.engine.begin() as conn:
            taken = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                .values(status=RUNNING, worker=worker, attempts=jobs.c.attempts + 1,
                        started_at=now, heartbeat_at=now, finished_at=None)
            ).rowcount
            if not taken:
                self._fetch(conn, job_id)  # raises for an unknown id; a known one just is not startable
                return None
            return self._fetch(conn, job_id)

    @staticmethod
    def _attempt_guard(attempt: int | None) -> list:
        """Fencing: with `attempt`, only the run that started as that attempt, still running, may write.

        A run given up for lost (requeued, or started again as the next attempt) may have been frozen,
        not dead; when it wakes up it must not touch the job. None: no fencing (the API's own writes).
        """
        return [] if attempt is None else [jobs.c.status == RUNNING, jobs.c.attempts == attempt]

    def heartbeat(self, job_id: str, progress: dict | None = None, attempt: int | None = None) -> bool:
        """Store a running job's progress and mark it alive; False when it is no longer running (as `attempt`)."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        with self.engine.begin() as conn:
            return bool(conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == RUNNING, *self._attempt_guard(attempt))
                .values(**values)
            ).rowcount)

    def finish(self, job_id: str, status: str, result: dict | None = None, error: str | None = None,
               attempt: int | None = None) -> dict | None:
        """Move a queued or running job to a final status; None when it already had one (never overwritten).

        With `attempt`, a run that was given up for lost since (requeued or restarted) cannot finish the job.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, received: {status!r}")
        with self.engine.begin() as conn:
            done = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE_STATUSES), *self._attempt_guard(attempt))
                .values(status=status, result=result, error=error, finished_at=utcnow())
            ).rowcount
            if not done:
                self._fetch(conn, job_id)
                return None
            return self._fetch(conn, job_id)

    def request_cancel(self, job_id: str) -> dict:
        """Cancel a queued job now, ask a running one to stop; a finished job is returned unchanged."""
        now = utcnow()
        with self.engine.begin() as conn:
            # The write comes first so SQLite takes its write lock before any read in this transaction.
            conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                .values(status=CANCELLED, cancel_requested=True, cancel_requested_at=now, finished_at=now)
            )
            # The first request starts the grace period (JOB_CANCEL_GRACE_SECONDS); asking again does not
            # put off the reconciler killing a run that ignores it.
            conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == RUNNING, jobs.c.cancel_requested_at.is_(None))
                .values(cancel_requested=True, cancel_requested_at=now)
            )
            return self._fetch(conn, job_id)

    def cancel_requested(self, job_id: str, attempt: int | None = None) -> bool:
        """Say whether the job should stop (the training loop polls this).

        With `attempt`, also when that run was superseded: the reconciler gave it up for lost (a
        worker frozen past JOB_STALE_SECONDS) and requeued or restarted the job, so it must not save.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(jobs.c.cancel_requested, jobs.c.status, jobs.c.attempts).where(jobs.c.id == job_id)
            ).first()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        superseded = attempt is not None and (row.status != RUNNING or row.attempts != attempt)
        return bool(row.cancel_requested) or row.status == CANCELLED or superseded

    def stale_running(self, older_than_seconds: float) -> list[dict]:
        """Return running jobs whose last heartbeat is older than `older_than_seconds`."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.status == RUNNING, jobs.c.heartbeat_at < cutoff)
                .order_by(jobs.c.heartbeat_at)
            ).all()
        return [_as_dict(row) for row in rows]

    def cancel_overdue(self, grace_seconds: float) -> list[dict]:
        """Return running jobs whose cancel was requested more than `grace_seconds` ago (they ignore it)."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.status == RUNNING, jobs.c.cancel_requested.is_(True),
                                      jobs.c.cancel_requested_at < cutoff)
                .order_by(jobs.c.cancel_requested_at)
            ).all()
        return [_as_dict(row) for row in rows]

    def requeue(self, job_id: str, *, older_than_seconds: float | None = None) -> bool:
        """Put a running job whose worker is lost back in the queue; True when it was requeued.

        A job that already used `max_attempts` fails with "worker lost N times"; one whose cancel
        was requested is cancelled. With `older_than_seconds`, a job that heartbeated since the
        reconciler looked is left alone, so a slow but live worker is not doubled.
        """
        now = utcnow()
        guard = [jobs.c.id == job_id, jobs.c.status == RUNNING]
        if older_than_seconds is not None:
            guard.append(jobs.c.heartbeat_at < now - timedelta(seconds=older_than_seconds))
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(*guard, jobs.c.cancel_requested.is_(True))
                .values(status=CANCELLED, finished_at=now)
            )
            conn.execute(
                jobs.update().where(*guard, jobs.c.attempts >= self.max_attempts)
                .values(status=FAILED, finished_at=now,
                        error=sa.literal("worker lost ") + sa.cast(jobs.c.attempts, sa.String) + " times")
            )
            return bool(conn.execute(
                jobs.update().where(*guard, jobs.c.attempts < self.max_attempts).values(status=QUEUED, worker=None)
            ).rowcount)
