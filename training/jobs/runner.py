"""One job's run: start it once, train with a heartbeat and cancel checks, record how it ended.

The job trains on its stored dataset as its manifest lists it. A dataset no ingest worker has
ingested yet (just uploaded, or sent with the train request) is ingested first, as the job's
`ingest` phase; one being ingested elsewhere is waited for, never ingested twice
(`DatasetStore.ingest`). A dataset whose ingest failed fails the job with the dataset's message.

`run_job` holds the logic the task calls, and is tested without a broker. Delivery is at least
once (`task_acks_late`): a redelivered message, or a job enqueued twice by the reconciler, is
harmless because `JobStore.start` lets only one run start it, and a rerun after a crash finds
the version the first run saved (its metadata names the job).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded

from training.errors import Cancelled, JobNotFoundError, TrainingError
from training.jobs.app import SOFT_TIME_LIMIT_S
from training.jobs.records import JobStore
from training.progress import EpochHistory, Progress, ProgressFn
from training.settings import Settings

if TYPE_CHECKING:
    from training.data.dataset import Dataset

log = logging.getLogger(__name__)

# The cancel check reads the database; the pipeline calls it per batch, so ask at most this often.
CANCEL_POLL_S = 0.5


class _Heartbeat:
    """Mark a job alive every `interval` seconds from a thread, however long one epoch or batch takes."""

    def __init__(self, jobs: JobStore, job_id: str, attempt: int, interval: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(jobs, job_id, attempt, interval), daemon=True,
                                       name=f"heartbeat-{job_id}")

    def _beat(self, jobs: JobStore, job_id: str, attempt: int, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                jobs.heartbeat(job_id, attempt=attempt)
            except Exception as exc:  # A database hiccup must not kill the training; the next beat retries.
                log.warning("heartbeat of job %s failed: %s", job_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class _Throttled:
    """A cancel check that asks the database at most once per `interval` seconds and stays True once True."""

    def __init__(self, check: Callable[[], bool], interval: float) -> None:
        self.check, self.interval = check, interval
        self.last: float | None = None
        self.value = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.value and (self.last is None or now - self.last >= self.interval):
            self.value, self.last = bool(self.check()), now
        return self.value


def _result(version: int, published: bool, metrics: dict) -> dict:
    return {"version": version, "published": published,
            "metrics": {key: metrics.get(key) for key in ("accuracy", "top_k_accuracy", "loss")}}


def run_job(job_id: str, settings: Settings, worker: str, *, cancel_poll_seconds: float = CANCEL_POLL_S) -> dict | None:
    """Run a queued job to a final status and return its record; None when it was not startable."""
    jobs = JobStore.from_settings(settings)
    try:
        try:
            job = jobs.start(job_id, worker)
        except JobNotFoundError:
            log.warning("job %s is not in the job store; message dropped", job_id)
            return None
        if job is None:
            # Running elsewhere, finished or cancelled: a redelivered or duplicate message.
            log.info("job %s is not queued; nothing to do", job_id)
            return None
        return _run_started(jobs, job, settings, cancel_poll_seconds)
    finally:
        jobs.close()


def _stored_dataset(settings: Settings, dataset_id: str, progress: ProgressFn) -> Dataset:
    """The job's dataset from its manifest, ingested first (phase `ingest`) when no worker has done it yet."""
    from training.data.store import READY, DatasetStore

    store = DatasetStore.from_settings(settings)
    if store.trainable(dataset_id)["status"] != READY:
        progress(Progress("ingest", 0, 1))
        store.ingest(dataset_id)  # waits for an ingest already under way instead of doing it twice
        progress(Progress("ingest", 1, 1))
    return store.dataset(dataset_id)  # DatasetError with the dataset's own message when its ingest failed


def _run_started(jobs: JobStore, job: dict, settings: Settings, cancel_poll_seconds: float) -> dict | None:
    """Train a started job and record how it ended."""
    from training.options import parse_options
    from training.pipeline import train
    from training.store import ModelStore

    # This run's attempt number fences it: once the job was given up for lost and started again, this
    # run's heartbeats, cancel checks and final status no longer touch the job (see JobStore.finish).
    job_id, attempt = job["id"], job["attempts"]
    try:
        store = ModelStore.from_settings(settings)
        # A rerun after a crash between saving the version and recording it: reuse that version.
        done = store.version_of_job(job["model"], job_id)
        params = parse_options(job["params"])
        if done is not None:
            log.info("job %s already produced %s version %s", job_id, job["model"], done)
            # The first run may have died between the rename and publishing: apply the job's policy now.
            published = store.apply_publish_policy(job["model"], done, params.publish)
            metrics = store.metadata(job["model"], done).get("metrics", {})
            return jobs.finish(job_id, "succeeded", attempt=attempt, result=_result(done, published, metrics))
        progress = EpochHistory(lambda p: jobs.heartbeat(job_id, p, attempt=attempt))
        cancel = _Throttled(lambda: jobs.cancel_requested(job_id, attempt), cancel_poll_seconds)
        with _Heartbeat(jobs, job_id, attempt, settings.job_heartbeat_seconds):
            dataset = _stored_dataset(settings, job["dataset"], progress)
            result = train(dataset, job["model"], settings, params, progress=progress, cancel=cancel, job_id=job_id)
    except Cancelled:
        log.info("job %s cancelled or superseded (attempt %s)", job_id, attempt)
        return jobs.finish(job_id, "cancelled", attempt=attempt)
    except SoftTimeLimitExceeded:
        return jobs.finish(job_id, "failed", attempt=attempt,
                           error=f"training ran longer than {SOFT_TIME_LIMIT_S / 3600:g} h")
    except (TrainingError, ValueError) as exc:
        log.info("job %s failed: %s", job_id, exc)
        return jobs.finish(job_id, "failed", error=str(exc), attempt=attempt)
    except Exception as exc:
        # Recorded, not re-raised: a job that crashes every time must not be redelivered forever.
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        return jobs.finish(job_id, "failed", error=f"internal error: {type(exc).__name__}: {exc}", attempt=attempt)
    return jobs.finish(job_id, "succeeded", attempt=attempt,
                       result=_result(result.version, result.published, result.metrics))
