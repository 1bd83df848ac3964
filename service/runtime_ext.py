"""The prediction runtime as a Flask extension: one `ModelRuntime` per process, made on first use.

gunicorn forks its workers before the app is loaded (no preload) and TensorFlow is not
fork-safe, so the runtime (and with it TensorFlow and the models) is built lazily inside
the worker that first needs it, never in a parent process.
"""

from __future__ import annotations

import os
import threading

from flask import Flask, current_app

from training.store import ModelStore


def init_app(app: Flask) -> None:
    """Prepare the runtime slot and the model store used by the read-only endpoints."""
    app.extensions["runtime"] = None
    app.extensions["runtime_lock"] = threading.Lock()
    app.extensions["store"] = ModelStore(app.config["SETTINGS"].model_dir)


def get_store() -> ModelStore:
    """The model store (cheap: reading the store needs no runtime, no TensorFlow)."""
    return current_app.extensions["store"]


def get_runtime():
    """The process's ModelRuntime, built on first use (thread-safe; rebuilt after a fork)."""
    ext = current_app.extensions
    runtime = ext.get("runtime")
    if runtime is not None and ext.get("runtime_pid", os.getpid()) == os.getpid():
        return runtime
    with ext["runtime_lock"]:
        runtime = ext.get("runtime")
        if runtime is None or ext.get("runtime_pid", os.getpid()) != os.getpid():
            from service import metrics
            from service.runtime import ModelRuntime, RuntimeHooks  # TensorFlow comes with it: in the worker only.

            hooks = RuntimeHooks(on_batch=metrics.record_batch, on_load=metrics.record_load,
                                 on_memory=metrics.record_memory)
            runtime = ModelRuntime(current_app.config["SETTINGS"], hooks)
            ext["runtime"], ext["runtime_pid"] = runtime, os.getpid()
    return runtime


def close_runtime(app: Flask) -> None:
    """Stop the runtime of this process, if one was built (gunicorn's worker_exit, tests)."""
    runtime = app.extensions.get("runtime")
    if runtime is not None and app.extensions.get("runtime_pid", os.getpid()) == os.getpid():
        app.extensions["runtime"] = None
        runtime.close()
