"""The service's resources as one Flask extension: the stores, and one runtime, job store and Celery app per process.

gunicorn forks its workers before it loads the app (no preload), and neither TensorFlow nor a
database engine's connections nor a broker pool survive a fork. So the prediction runtime, the job
store and the Celery app are each built on first use, inside the process that uses it, and a process
that finds one its parent built builds its own. The model and dataset stores are only folders:
`init_app` opens them (no I/O). `close` releases what this process built.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from flask import Flask, current_app

from training.data.store import DatasetStore
from training.exports import ExportStore
from training.jobs.records import JobStore
from training.settings import Settings
from training.store import ModelStore

if TYPE_CHECKING:
    from celery import Celery

    from service.runtime import ModelRuntime


class _Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=_Closable)


class _PerProcess(Generic[T]):
    """A resource built on first use, once per process and thread-safely; a forked child builds its own."""

    def __init__(self, build: Callable[[Settings], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        # (resource, id of the process that built it): one attribute, so a thread reads both at once.
        self._built: tuple[T, int] | None = None

    def get(self, settings: Settings) -> T:
        """Return this process's resource, building it from `settings` if there is none yet."""
        built = self._built
        if built is None or built[1] != os.getpid():
            with self._lock:
                built = self._built
                if built is None or built[1] != os.getpid():
                    built = self._built = (self._build(settings), os.getpid())
        return built[0]

    def current(self) -> T | None:
        """Return this process's resource if it was built, else None (building nothing)."""
        built = self._built
        return built[0] if built is not None and built[1] == os.getpid() else None

    def set(self, resource: T | None) -> None:
        """Use `resource` in this process (a stand-in, in tests); None builds a fresh one on next use."""
        self._built = None if resource is None else (resource, os.getpid())

    def close(self) -> None:
        """Close this process's resource and forget it; one a parent process built is the parent's to close."""
        with self._lock:
            built, self._built = self._built, None
        if built is not None and built[1] == os.getpid():
            built[0].close()


def _build_runtime(settings: Settings) -> ModelRuntime:
    """Build a prediction runtime that reports its batches, loads and memory to the metrics."""
    from service import metrics
    from service.runtime import ModelRuntime, RuntimeHooks  # TensorFlow comes with it: in the worker only.

    hooks = RuntimeHooks(on_batch=metrics.record_batch, on_load=metrics.record_load, on_memory=metrics.record_memory)
    return ModelRuntime(settings, hooks)


def _build_celery(settings: Settings) -> Celery:
    """Build the Celery app that sends training jobs and dataset ingests (connected on first send)."""
    from training.jobs.app import make_celery  # Celery and kombu only, and only once a job is sent.

    return make_celery(settings)


# Closed in this order by `close`: the runtime's batching threads first, while the rest still works.
PER_PROCESS: dict[str, Callable[[Settings], Any]] = {
    "runtime": _build_runtime, "jobs": JobStore.from_settings, "celery": _build_celery}


def init_app(app: Flask) -> None:
    """Open the model, dataset and export stores; prepare the per-process resources, built on first use."""
    settings = app.config["SETTINGS"]
    app.extensions["store"] = ModelStore.from_settings(settings)
    app.extensions["datasets"] = DatasetStore.from_settings(settings)
    app.extensions["exports"] = ExportStore.from_settings(settings)
    for name, build in PER_PROCESS.items():
        app.extensions[name] = _PerProcess(build)


def _per_process(name: str) -> Any:
    """This process's resource `name` of the current app, built on first use."""
    return current_app.extensions[name].get(current_app.config["SETTINGS"])


def get_runtime() -> ModelRuntime:
    """The process's prediction runtime (TensorFlow and the models: in the process that predicts)."""
    return _per_process("runtime")


def get_jobs() -> JobStore:
    """The job store (`DATABASE_URL`, or SQLite under `DATA_DIR`)."""
    return _per_process("jobs")


def get_celery() -> Celery:
    """The Celery app that sends training jobs (queue `training`) and dataset ingests (queue `ingest`)."""
    return _per_process("celery")


def get_store() -> ModelStore:
    """The model store (cheap: reading the store needs no runtime, no TensorFlow)."""
    return current_app.extensions["store"]


def get_datasets() -> DatasetStore:
    """The dataset store under `DATA_DIR/datasets`."""
    return current_app.extensions["datasets"]


def get_exports() -> ExportStore:
    """The exported archives under `DATA_DIR/exports`."""
    return current_app.extensions["exports"]


def close(app: Flask) -> None:
    """Close what this process built: the runtime's threads, the job store's connections, the broker pool."""
    for name in PER_PROCESS:
        app.extensions[name].close()
