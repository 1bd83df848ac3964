"""The reconciler: what no worker can do for itself once it died, froze or lost its message.

Each round requeues running jobs whose heartbeat went stale (a dead worker), re-sends queued jobs
whose message the broker lost, kills runs still going long after a cancel request, re-sends the
ingest of datasets left queued (a lost message) or left ingesting by a process that died, and
removes the staging folders crashed saves and uploads left. `reconcile_every` repeats rounds for
`python -m training.jobs reconcile --every N`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from celery import Celery

from training.errors import StoreUnavailable
from training.jobs.app import INGEST_QUEUE, QUEUE, enqueue, enqueue_ingest, make_broker_folders, make_celery
from training.jobs.records import CANCELLED, QUEUED, JobStore
from training.settings import Settings

log = logging.getLogger(__name__)

# Older than any save or upload in progress: a staging folder this old was left by a crash.
LEFTOVER_SECONDS = 3600


def _queue_size(app: Celery, queue: str = QUEUE) -> int | None:
    """Messages waiting in a queue, or None when the broker cannot say."""
    try:
        with app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(queue, passive=True).message_count
    except Exception as exc:  # a missing queue or a transport that cannot count
        log.warning("could not count the %s queue: %s", queue, exc)
        return None


def _resend_ingests(settings: Settings, app: Celery, lost_after_seconds: float) -> int:
    """Re-send the ingest of datasets whose process died mid-ingest or whose message was lost; return how many."""
    from training.data.store import DatasetStore

    store = DatasetStore.from_settings(settings)
    abandoned = store.requeue_abandoned()
    for dataset_id in abandoned:
        log.warning("dataset %s was left ingesting by a process that died; sent again", dataset_id)
    # As for jobs: datasets may wait behind a long ingest, so only when the queue holds fewer messages
    # than datasets wait (a duplicate is harmless, the ingest lock runs it once, but it costs a worker).
    waiting = store.queued()
    cutoff = (datetime.now(UTC) - timedelta(seconds=lost_after_seconds)).isoformat(timespec="microseconds")
    # A record without `created` (written by an early version) counts as old.
    old = [r["id"] for r in waiting if r["id"] not in abandoned and (r.get("created") or "") < cutoff]
    size = _queue_size(app, INGEST_QUEUE) if old else None
    if size is not None and size >= len(waiting):
        old = []
    for dataset_id in [*abandoned, *old]:
        enqueue_ingest(app, dataset_id)
    return len(abandoned) + len(old)


def _sweep(settings: Settings) -> int:
    """Remove the staging and removal folders that crashed saves and uploads left; return how many."""
    from training.data.store import DatasetStore
    from training.store import ModelStore, sweep_leftovers

    try:
        swept = ModelStore.from_settings(settings).sweep(LEFTOVER_SECONDS)
    except StoreUnavailable as exc:  # the shared store is away: the jobs still need their round, sweep next time
        log.warning("could not sweep the model store this round: %s", exc)
        swept = []
    swept += sweep_leftovers(DatasetStore.from_settings(settings).root, LEFTOVER_SECONDS)
    for path in swept:
        log.warning("removed %s, left by a crashed save or upload", path)
    return len(swept)


def _kill_overdue_cancels(jobs: JobStore, app: Celery, grace_seconds: float) -> int:
    """Kill the runs of jobs still running `grace_seconds` after a cancel request; record them cancelled."""
    killed = 0
    for job in jobs.cancel_overdue(grace_seconds):
        try:
            # The task id is the job id (see enqueue). Revoked first: the record says cancelled only once
            # the kill went out; a redelivered message of this task is then dropped by the workers too.
            app.control.revoke(job["id"], terminate=True, signal="SIGKILL")
        except Exception as exc:  # The broker is down: the job stays running and the next run tries again.
            log.warning("could not revoke job %s: %s", job["id"], exc)
            continue
        # Fenced by the attempt, so a job that stopped by itself meanwhile keeps the status it recorded.
        if jobs.finish(job["id"], CANCELLED, attempt=job["attempts"],
                       error=f"did not stop within {grace_seconds:g} s of the cancel request "
                             "(JOB_CANCEL_GRACE_SECONDS); its worker process was killed"):
            log.warning("job %s ignored its cancel request for %g s; killed", job["id"], grace_seconds)
            killed += 1
    return killed


def reconcile(settings: Settings, app: Celery, stale_after_seconds: float | None = None,
              lost_after_seconds: float = 600, cancel_grace_seconds: float | None = None) -> dict:
    """Requeue jobs whose worker died, re-send lost messages and ingests, kill ignored cancels; return counts."""
    if stale_after_seconds is None:
        stale_after_seconds = settings.job_stale_seconds
    if cancel_grace_seconds is None:
        cancel_grace_seconds = settings.job_cancel_grace_seconds
    make_broker_folders(app)  # the embedded broker's queue is counted below, maybe before anything was sent
    jobs = JobStore.from_settings(settings)
    counts = {"requeued": 0, "given_up": 0, "resent": 0, "killed": 0, "ingests_resent": 0, "swept": _sweep(settings)}
    requeued: set[str] = set()
    try:
        counts["killed"] = _kill_overdue_cancels(jobs, app, cancel_grace_seconds)
        for job in jobs.stale_running(stale_after_seconds):
            # The guard re-checks the heartbeat, so a worker that just reported is left alone.
            if jobs.requeue(job["id"], older_than_seconds=stale_after_seconds):
                enqueue(app, job["id"])
                requeued.add(job["id"])
                counts["requeued"] += 1
            elif jobs.get(job["id"])["status"] != "running":
                counts["given_up"] += 1  # out of attempts (failed) or cancel requested (cancelled)
        queued = jobs.recent(limit=10_000, status=QUEUED)
        cutoff = datetime.now(UTC) - timedelta(seconds=lost_after_seconds)
        old = [job for job in queued
               if job["id"] not in requeued and datetime.fromisoformat(job["created_at"]) < cutoff]
        # Jobs legitimately wait behind long ones; re-send only when the queue holds fewer messages
        # than there are queued jobs, so waiting jobs do not pile up duplicates on every run.
        # (A duplicate is harmless, JobStore.start runs a job once, but it costs a worker wake-up.)
        size = _queue_size(app) if old else None
        if old and (size is None or size < len(queued)):
            for job in old:
                enqueue(app, job["id"])
                counts["resent"] += 1
        counts["ingests_resent"] = _resend_ingests(settings, app, lost_after_seconds)
    finally:
        jobs.close()
    return counts


def reconcile_every(settings: Settings, every: float | None, lost_after_seconds: float,
                    report: Callable[[dict], None]) -> None:
    """Reconcile once (`every` None) or every `every` seconds until interrupted; report rounds that did something."""
    app = make_celery(settings)
    while True:
        try:
            counts = reconcile(settings, app, lost_after_seconds=lost_after_seconds)
        except Exception as exc:
            if not every:
                raise
            # The broker or the job database is down for a while: say so and try again, never exit.
            print(f"reconcile failed, next try in {every:g} s: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            if any(counts.values()) or not every:
                report(counts)
            if not every:
                return
        time.sleep(every)
