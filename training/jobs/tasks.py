"""The tasks the workers run: train a job and export a version (the `training` queue), ingest a dataset (`ingest`).

Each task is thin: it takes an id and calls the library, which re-reads the record. Shared tasks,
so every app `make_celery` builds has them once a worker imports this module (the app's `include`).
Nothing here imports TensorFlow: an ingest worker never does, and a training worker's child
imports it when its job starts (each child runs one task: `worker_max_tasks_per_child=1`).
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Task, shared_task

from training.errors import DatasetNotFoundError, NotFound
from training.jobs.app import EXPORT_TASK_NAME, INGEST_TASK_NAME, TASK_NAME
from training.jobs.runner import run_job
from training.settings import get_settings

log = logging.getLogger(__name__)


@shared_task(name=TASK_NAME, bind=True)
def train_model(self: Task, job_id: str) -> None:
    """Run one training job by id."""
    _let_gpu_memory_grow()
    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    run_job(job_id, get_settings(), worker)


@shared_task(name=INGEST_TASK_NAME)
def ingest_dataset(dataset_id: str) -> None:
    """Ingest one uploaded dataset by id: unpack, check, write its manifest (once, however often it is sent)."""
    # Imported here: the worker's parent process stays free of image libraries until a child needs them.
    from training.data.store import DatasetStore

    try:
        record = DatasetStore.from_settings(get_settings()).ingest(dataset_id)
    except DatasetNotFoundError:
        log.warning("dataset %s is not in the dataset store; message dropped", dataset_id)
        return
    log.info("dataset %s %s%s", dataset_id, record["status"], f": {record['error']}" if record["error"] else "")


@shared_task(name=EXPORT_TASK_NAME)
def export_version(name: str, version: int, fmt: str) -> None:
    """Export one model version in one format into the export store (once, however often it is sent)."""
    _let_gpu_memory_grow()
    from training.exports import ExportStore

    try:
        ExportStore.from_settings(get_settings()).build(get_settings(), name, version, fmt)
    except NotFound as exc:  # the version was deleted since the export was asked for
        log.warning("export of %s v%s as %s dropped: %s", name, version, fmt, exc.message)
    except Exception:  # recorded in the export store (the API answers it); the message must not be retried
        log.warning("export of %s v%s as %s failed; the API reports why", name, version, fmt)


def _let_gpu_memory_grow() -> None:
    """Let TensorFlow take GPU memory as it needs it instead of all of it at start (once per worker child)."""
    # Imported here, in the child that trains, never in the parent: forking after TensorFlow started is unsafe,
    # and an ingest worker has no use for it.
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # the GPU was initialised already
            log.warning("could not turn on memory growth for %s: %s", gpu.name, exc)
