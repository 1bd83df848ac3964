"""Model version numbers and published pointers in the job database, for the shared model store.

Object storage has no rename and no compare-and-swap, so what must be transactional lives in SQL
(DATABASE_URL: PostgreSQL in compose, the same database as the job records): a model's row in
`model_names` holds the last number handed out and the published version; `model_versions` holds
each version's state (`uploading` → `complete`, or `abandoned`, or later `deleted`), the digest of its
files, its metadata and labels. Every change is one transaction that locks the model's row, so two
workers never get one number, and a publish is one UPDATE that every replica sees on its next read.
Numbers are never handed out twice, even after a delete: serving caches must never mistake new
weights for old ones.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from training.errors import ModelNotFoundError, StoreConflictError, StoreUnavailable
from training.jobs.records import JobStore, UTCDateTime, create_missing, utcnow
from training.store import publish_decision

UPLOADING, COMPLETE, ABANDONED, DELETED, PURGED = "uploading", "complete", "abandoned", "deleted", "purged"

metadata = sa.MetaData()
model_names = sa.Table(
    "model_names",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("last_version", sa.Integer, nullable=False),
    sa.Column("published", sa.Integer, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("digest", sa.String(64), nullable=True),
    sa.Column("job", sa.String(64), nullable=True),
    sa.Column("meta", sa.JSON, nullable=True),
    sa.Column("labels", sa.JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_model_versions_state", "state", "created_at"),
)


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached into StoreUnavailable (a 503, or a failed job), never a 500."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        shown = sa.make_url(url).render_as_string(hide_password=True)
        raise StoreUnavailable(f"job database {shown} is unreachable: {exc.orig or exc}") from exc


class VersionRegistry:
    """Version numbers, states and published pointers of the shared model store, in SQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: tuple[Engine, int] | None = None
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """This process's engine, made (and the tables created) on first use: a forked child makes its own."""
        with self._lock:
            if self._engine is None or self._engine[1] != os.getpid():
                engine = JobStore._make_engine(self.url)
                with database_errors(self.url):
                    create_missing(metadata, engine)
                self._engine = (engine, os.getpid())
            return self._engine[0]

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        with database_errors(self.url), self.engine().begin() as conn:
            yield conn

    def _lock_name(self, conn: Connection, name: str) -> sa.Row | None:
        """The model's row, locked until the transaction ends; None when the model has none yet.

        Locked by writing it first (not SELECT ... FOR UPDATE): on PostgreSQL that locks the row, on
        SQLite it takes the database's write lock before anything is read, so two writers queue behind
        the busy timeout instead of one failing on a stale read snapshot.
        """
        conn.execute(model_names.update().where(model_names.c.name == name).values(updated_at=utcnow()))
        return conn.execute(sa.select(model_names).where(model_names.c.name == name)).first()

    # --- writing ------------------------------------------------------------------------------------------------

    def reserve(self, name: str, job: str | None) -> int:
        """Hand out the next version number of `name`, recorded as `uploading` (invisible until complete)."""
        now = utcnow()
        with self._begin() as conn:
            if self._lock_name(conn, name) is None:
                try:
                    with conn.begin_nested():
                        conn.execute(model_names.insert().values(name=name, last_version=0, updated_at=now))
                except sa.exc.IntegrityError:
                    pass  # made by a concurrent first save of the same name
                self._lock_name(conn, name)
            conn.execute(model_names.update().where(model_names.c.name == name)
                         .values(last_version=model_names.c.last_version + 1, updated_at=now))
            version = conn.execute(sa.select(model_names.c.last_version).where(model_names.c.name == name)).scalar_one()
            conn.execute(model_versions.insert().values(name=name, version=version, state=UPLOADING, job=job,
                                                        created_at=now, updated_at=now))
        return version

    def complete(self, name: str, version: int, digest: str, meta: dict, labels: list[str], policy: str) -> bool:
        """Make an uploaded version visible and apply the publish policy, in one transaction; return if published."""
        with self._begin() as conn:
            row = self._lock_name(conn, name)
            done = conn.execute(model_versions.update()
                                .where(model_versions.c.name == name, model_versions.c.version == version,
                                       model_versions.c.state == UPLOADING)
                                .values(state=COMPLETE, digest=digest, meta=meta, labels=labels, updated_at=utcnow()))
            if done.rowcount != 1:
                raise StoreConflictError(f"version {version} of {name!r} was given up while it uploaded (a stale "
                                         "save swept by the reconciler); nothing was published")
            return self._apply(conn, name, version, meta, row.published, policy)

    def _apply(self, conn: Connection, name: str, version: int, meta: dict, current: int | None, policy: str) -> bool:
        """Publish `version` if `policy` says so against the published one (call with the model's row locked)."""
        if current == version:
            return True
        current_meta = self._meta(conn, name, current) if current is not None else None
        if not publish_decision(policy, meta, current_meta):
            return False
        conn.execute(model_names.update().where(model_names.c.name == name)
                     .values(published=version, updated_at=utcnow()))
        return True

    def abandon(self, name: str, version: int) -> None:
        """Give up a version whose upload failed: it never becomes visible and its number is never reused."""
        with self._begin() as conn:
            conn.execute(model_versions.update()
                         .where(model_versions.c.name == name, model_versions.c.version == version,
                                model_versions.c.state == UPLOADING)
                         .values(state=ABANDONED, updated_at=utcnow()))

    def publish(self, name: str, version: int) -> None:
        """Make a complete version the published one (publish or roll back)."""
        with self._begin() as conn:
            self._lock_name(conn, name)
            self._require(conn, name, version)
            conn.execute(model_names.update().where(model_names.c.name == name)
                         .values(published=version, updated_at=utcnow()))

    def apply_policy(self, name: str, version: int, policy: str) -> bool:
        """Publish an existing version if `policy` says so; return whether it is published."""
        with self._begin() as conn:
            row = self._lock_name(conn, name)
            meta = self._require(conn, name, version)
            return self._apply(conn, name, version, meta, row.published, policy)

    def delete(self, name: str, version: int) -> None:
        """Mark a complete version deleted (its objects go after); refused for the published one."""
        with self._begin() as conn:
            row = self._lock_name(conn, name)
            self._require(conn, name, version)
            if row.published == version:
                raise StoreConflictError(f"version {version} of {name!r} is published; publish another first")
            conn.execute(model_versions.update()
                         .where(model_versions.c.name == name, model_versions.c.version == version)
                         .values(state=DELETED, updated_at=utcnow()))

    def stale_uploads(self, older_than_seconds: float) -> list[tuple[str, int]]:
        """Mark abandoned the uploads started longer ago than `older_than_seconds` (their worker died); return them."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        stale = (model_versions.c.state == UPLOADING) & (model_versions.c.created_at < cutoff)
        with self._begin() as conn:
            rows = conn.execute(sa.select(model_versions.c.name, model_versions.c.version).where(stale)).all()
            conn.execute(model_versions.update().where(stale).values(state=ABANDONED, updated_at=utcnow()))
        return [(row.name, row.version) for row in rows]

    def given_up(self) -> list[tuple[str, int]]:
        """Versions abandoned or deleted whose objects are not yet removed."""
        with self._begin() as conn:
            rows = conn.execute(sa.select(model_versions.c.name, model_versions.c.version)
                                .where(model_versions.c.state.in_((ABANDONED, DELETED)))).all()
        return [(row.name, row.version) for row in rows]

    def purged(self, name: str, version: int) -> None:
        """Record that a given-up version's objects are removed (its number stays taken)."""
        with self._begin() as conn:
            conn.execute(model_versions.update()
                         .where(model_versions.c.name == name, model_versions.c.version == version,
                                model_versions.c.state.in_((ABANDONED, DELETED)))
                         .values(state=PURGED, updated_at=utcnow()))

    # --- reading ------------------------------------------------------------------------------------------------

    def _meta(self, conn: Connection, name: str, version: int) -> dict | None:
        return conn.execute(sa.select(model_versions.c.meta).where(
            model_versions.c.name == name, model_versions.c.version == version,
            model_versions.c.state == COMPLETE)).scalar_one_or_none()

    def _require(self, conn: Connection, name: str, version: int) -> dict:
        meta = self._meta(conn, name, version)
        if meta is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        return meta

    def snapshot(self, name: str) -> tuple[list[int], int | None]:
        """A model's complete versions (ascending) and its published version, read together."""
        with self._begin() as conn:
            versions = conn.execute(sa.select(model_versions.c.version).where(
                model_versions.c.name == name, model_versions.c.state == COMPLETE)
                .order_by(model_versions.c.version)).scalars().all()
            published = conn.execute(sa.select(model_names.c.published)
                                     .where(model_names.c.name == name)).scalar_one_or_none()
        return list(versions), published if published in versions else None

    def names(self) -> list[str]:
        """Names of the models with at least one complete version."""
        with self._begin() as conn:
            return list(conn.execute(sa.select(model_versions.c.name).distinct()
                                     .where(model_versions.c.state == COMPLETE)
                                     .order_by(model_versions.c.name)).scalars())

    def version(self, name: str, version: int) -> dict:
        """A complete version's row: digest, job, meta, labels; ModelNotFoundError if there is none."""
        with self._begin() as conn:
            row = conn.execute(sa.select(model_versions).where(
                model_versions.c.name == name, model_versions.c.version == version,
                model_versions.c.state == COMPLETE)).first()
        if row is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        return dict(row._mapping)

    def version_of_job(self, name: str, job: str) -> int | None:
        """The complete version a training job produced, or None."""
        with self._begin() as conn:
            return conn.execute(sa.select(sa.func.max(model_versions.c.version)).where(
                model_versions.c.name == name, model_versions.c.job == job,
                model_versions.c.state == COMPLETE)).scalar_one_or_none()

    def close(self) -> None:
        """Close this process's pooled connections."""
        with self._lock:
            if self._engine is not None and self._engine[1] == os.getpid():
                self._engine[0].dispose()
            self._engine = None
