"""Per-process resources: built once on first use, rebuilt after a fork, closed by `close` (gunicorn worker_exit)."""

from __future__ import annotations

import os
import runpy
import threading
import time
from types import SimpleNamespace

from service import extensions
from service.extensions import _PerProcess, get_celery, get_jobs, get_runtime
from tests.live import ROOT


class Closable:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_resource_is_built_once_however_many_threads_ask_first(settings):
    built = []

    def build(_settings):
        time.sleep(0.05)  # long enough for every thread to arrive while the first one builds
        built.append(Closable())
        return built[-1]

    slot = _PerProcess(build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(slot.get(settings))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(built) == 1 and got == built * 8


def test_a_forked_child_builds_its_own_and_leaves_the_parents_to_the_parent(settings, monkeypatch):
    slot = _PerProcess(lambda _settings: Closable())
    parents = slot.get(settings)
    parent_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent_pid + 1)  # as in a gunicorn worker forked after it was built

    assert slot.current() is None
    childs = slot.get(settings)
    assert childs is not parents and slot.get(settings) is childs
    slot.close()
    assert childs.closed and not parents.closed

    slot.set(parents)  # as if inherited again: this process did not build it, so closing it is not its job
    monkeypatch.setattr(os, "getpid", lambda: parent_pid + 2)
    slot.close()
    assert not parents.closed and slot.current() is None


def record_closing(resources: dict, closed: list, monkeypatch) -> None:
    """Make each resource note its name in `closed` when it is closed (and still close)."""
    for name, resource in resources.items():
        monkeypatch.setattr(resource, "close", lambda name=name, close=resource.close: closed.append(name) or close())


def test_close_closes_every_resource_this_process_built(fake_app, monkeypatch):
    app = fake_app()
    with app.app_context():
        built = {"runtime": get_runtime(), "jobs": get_jobs(), "celery": get_celery()}
        assert get_jobs() is built["jobs"] and get_celery() is built["celery"]
    closed: list[str] = []
    record_closing(built, closed, monkeypatch)

    extensions.close(app)

    assert closed == ["runtime", "jobs", "celery"]
    assert all(app.extensions[name].current() is None for name in built)
    with app.app_context():
        assert get_jobs() is not built["jobs"]  # built again on next use
    extensions.close(app)


def test_gunicorns_worker_exit_closes_the_workers_resources(fake_app, monkeypatch):
    app = fake_app()
    with app.app_context():
        built = {"runtime": get_runtime(), "jobs": get_jobs()}
    closed: list[str] = []
    record_closing(built, closed, monkeypatch)
    config = runpy.run_path(str(ROOT / "gunicorn.conf.py"))

    config["worker_exit"](None, SimpleNamespace(wsgi=app))

    assert closed == ["runtime", "jobs"]
