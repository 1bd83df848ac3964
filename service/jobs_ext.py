"""Training jobs as a Flask extension: one JobStore, one DatasetStore and one Celery app per process.

Each is built on first use from `app.config["SETTINGS"]`, inside the process that uses it:
gunicorn loads the app after the fork, and a database engine or a broker connection must
not be shared across a fork. Importing `training.tasks` imports Celery, never TensorFlow.
"""

from __future__ import annotations

import os
import threading

from flask import Flask, current_app

from training.datasets import DatasetStore
from training.jobs import JobStore

KEYS = ("jobs", "celery")


def init_app(app: Flask) -> None:
    """Prepare the lazily built job store and Celery app; open the dataset store (a folder, no I/O)."""
    app.extensions["jobs_lock"] = threading.Lock()
    for key in KEYS:
        app.extensions[key] = None
    app.extensions["datasets"] = DatasetStore.from_settings(app.config["SETTINGS"])


def _lazy(key: str, build):
    """The process's object under `key`, built once per process (thread-safe; rebuilt after a fork)."""
    ext = current_app.extensions
    value, pid = ext.get(key), ext.get(f"{key}_pid")
    if value is not None and pid == os.getpid():
        return value
    with ext["jobs_lock"]:
        if ext.get(key) is None or ext.get(f"{key}_pid") != os.getpid():
            ext[key], ext[f"{key}_pid"] = build(current_app.config["SETTINGS"]), os.getpid()
        return ext[key]


def get_jobs() -> JobStore:
    """The job store (`DATABASE_URL`, or SQLite under `DATA_DIR`)."""
    return _lazy("jobs", JobStore.from_settings)


def get_datasets() -> DatasetStore:
    """The dataset store under `DATA_DIR/datasets`."""
    return current_app.extensions["datasets"]


def _make_celery(settings):
    from training.tasks import make_celery  # Celery and kombu only: no TensorFlow.

    return make_celery(settings)


def get_celery():
    """The Celery app that sends training jobs to the `training` queue."""
    return _lazy("celery", _make_celery)


def close_jobs(app: Flask) -> None:
    """Release this process's database connections and broker pool (tests, worker exit)."""
    jobs, celery = app.extensions.get("jobs"), app.extensions.get("celery")
    app.extensions["jobs"] = app.extensions["celery"] = None
    if jobs is not None:
        jobs.close()
    if celery is not None:
        celery.close()
