"""Celery side of training jobs: the app, one thin task, and the job logic it calls.

The job record in `JobStore` is the source of truth; the broker only carries job ids.
`run_job` holds the logic and is tested without a broker; `train_model` re-reads the
settings and calls it. Start a worker (one per GPU) with:

    celery -A training.tasks worker -Q training --concurrency 1

Delivery is at least once (`task_acks_late`): a redelivered message, or a job enqueued
twice by `reconcile`, is harmless because `JobStore.start` lets only one run start it, and
a rerun after a crash finds the version the first run saved (its metadata names the job).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from training.errors import Cancelled, TrainingError
from training.jobs import CANCELLED, QUEUED, JobNotFoundError, JobStore
from training.progress import EpochHistory
from training.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUE = "training"
TASK_NAME = "training.train_model"
# A job runs for hours at most; the soft limit lets it record "failed", the hard one kills it.
SOFT_TIME_LIMIT_S = 6 * 3600
TIME_LIMIT_S = SOFT_TIME_LIMIT_S + 5 * 60
# Redis redelivers an unacked message after this long; it must outlast the longest job, or a
# second worker would pick the job up while the first still runs it.
VISIBILITY_TIMEOUT_S = TIME_LIMIT_S + 3600
# The cancel check reads the database; the pipeline calls it per batch, so ask at most this often.
CANCEL_POLL_S = 0.5


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app: the configured broker, or a filesystem broker under DATA_DIR when none is."""
    app = Celery("training")
    if settings.celery_broker_url:
        broker = settings.celery_broker_url
        transport_options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    else:
        # Single machine, no server to run: messages are files in a shared folder.
        root = settings.data_dir / "broker"
        queue_folder, processed = root / "queue", root / "processed"
        for folder in (queue_folder, processed):
            folder.mkdir(parents=True, exist_ok=True)
        broker = "filesystem://"
        transport_options = {"data_folder_in": str(queue_folder), "data_folder_out": str(queue_folder),
                             "processed_folder": str(processed), "store_processed": False,
                             "control_folder": str(root / "control")}
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Job state lives in JobStore; nothing reads Celery results.
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={TASK_NAME: {"queue": QUEUE}},
        # A GPU job takes minutes to hours: ack after it ran, take one at a time, and give the
        # message back when the worker dies mid-job (JobStore.start makes the rerun safe).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A fresh child per job: TensorFlow frees GPU memory only when its process exits.
        worker_max_tasks_per_child=1,
        # Each child imports Keras/TensorFlow at start (worker_process_init): on a busy machine that
        # takes longer than Celery's default 4 s, which then kills the child and forks another, forever.
        worker_proc_alive_timeout=120,
        task_soft_time_limit=SOFT_TIME_LIMIT_S,
        task_time_limit=TIME_LIMIT_S,
    )
    return app


app = make_celery(get_settings())


@worker_process_init.connect
def _let_gpu_memory_grow(**_) -> None:
    """Let TensorFlow take GPU memory as it needs it instead of all of it at start (per worker child)."""
    # Imported here, in the child, never in the parent: forking after TensorFlow started is unsafe.
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # the GPU was initialised already
            log.warning("could not turn on memory growth for %s: %s", gpu.name, exc)


@app.task(name=TASK_NAME, bind=True)
def train_model(self, job_id: str) -> None:
    """Run one training job by id."""
    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    run_job(job_id, get_settings(), worker)


def enqueue(app: Celery, job_id: str) -> None:
    """Send a job to the training queue."""
    # The task id is the job id, so the reconciler can revoke (kill) a job's run knowing only the job.
    app.send_task(TASK_NAME, args=[job_id], queue=QUEUE, task_id=job_id)


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


def _run_started(jobs: JobStore, job: dict, settings: Settings, cancel_poll_seconds: float) -> dict | None:
    """Train a started job and record how it ended."""
    from training.datasets import DatasetStore
    from training.options import parse_options
    from training.pipeline import train
    from training.store import ModelStore

    # This run's attempt number fences it: once the job was given up for lost and started again, this
    # run's heartbeats, cancel checks and final status no longer touch the job (see JobStore.finish).
    job_id, attempt = job["id"], job["attempts"]
    try:
        store = ModelStore(settings.model_dir)
        # A rerun after a crash between saving the version and recording it: reuse that version.
        done = store.version_of_job(job["model"], job_id)
        params = parse_options(job["params"])
        if done is not None:
            log.info("job %s already produced %s version %s", job_id, job["model"], done)
            # The first run may have died between the rename and publishing: apply the job's policy now.
            published = store.apply_publish_policy(job["model"], done, params.publish)
            metrics = store.metadata(job["model"], done).get("metrics", {})
            return jobs.finish(job_id, "succeeded", attempt=attempt, result=_result(done, published, metrics))
        source = DatasetStore.from_settings(settings).path(job["dataset"])
        with _Heartbeat(jobs, job_id, attempt, settings.job_heartbeat_seconds):
            result = train(source, job["model"], settings, params,
                           progress=EpochHistory(lambda p: jobs.heartbeat(job_id, p, attempt=attempt)),
                           cancel=_Throttled(lambda: jobs.cancel_requested(job_id, attempt), cancel_poll_seconds),
                           job_id=job_id)
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


def _queue_size(app: Celery) -> int | None:
    """Messages waiting in the training queue, or None when the broker cannot say."""
    try:
        with app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(QUEUE, passive=True).message_count
    except Exception as exc:  # a missing queue or a transport that cannot count
        log.warning("could not count the %s queue: %s", QUEUE, exc)
        return None


# Older than any save or upload in progress: a staging folder this old was left by a crash.
LEFTOVER_SECONDS = 3600


def _sweep(settings: Settings) -> int:
    """Remove the staging and removal folders that crashed saves and uploads left; return how many."""
    from training.datasets import DatasetStore
    from training.store import ModelStore, sweep_leftovers

    swept = ModelStore(settings.model_dir).sweep(LEFTOVER_SECONDS)
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
    """Requeue jobs whose worker died, re-send lost messages, kill runs that ignore a cancel; return counts."""
    if stale_after_seconds is None:
        stale_after_seconds = settings.job_stale_seconds
    if cancel_grace_seconds is None:
        cancel_grace_seconds = settings.job_cancel_grace_seconds
    jobs = JobStore.from_settings(settings)
    counts = {"requeued": 0, "given_up": 0, "resent": 0, "killed": 0, "swept": _sweep(settings)}
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
        queued = jobs.list(limit=10_000, status=QUEUED)
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
    finally:
        jobs.close()
    return counts
