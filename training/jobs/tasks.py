"""The task a training worker runs, and the set-up of each worker child that runs it.

The task is thin: it takes a job id and calls `run_job`, which re-reads the job. A shared task,
so every app `make_celery` builds has it once a worker imports this module (the app's `include`).
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Task, shared_task
from celery.signals import worker_process_init

from training.jobs.app import TASK_NAME
from training.jobs.runner import run_job
from training.settings import get_settings

log = logging.getLogger(__name__)


@shared_task(name=TASK_NAME, bind=True)
def train_model(self: Task, job_id: str) -> None:
    """Run one training job by id."""
    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    run_job(job_id, get_settings(), worker)


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
