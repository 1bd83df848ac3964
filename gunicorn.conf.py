"""gunicorn settings for the prediction service: `gunicorn -c gunicorn.conf.py wsgi:app`.

Where to listen and how many processes and threads come from the same settings as the
app (HOST, PORT, WEB_CONCURRENCY, THREADS; see .env.example).
"""

import os
import shutil
import tempfile
from pathlib import Path

from service.auth import check_bind
from training.settings import Settings

_settings = Settings.from_env()
_host = f"[{_settings.host}]" if ":" in _settings.host else _settings.host  # IPv6 literals need brackets

bind = [f"{_host}:{_settings.port}"]
workers = _settings.web_concurrency
# Threads, not more processes: a worker's threads share one copy of the backbone and models,
# and their concurrent requests are what the micro-batcher gathers into one forward pass.
worker_class = "gthread"
threads = _settings.threads
# No preload: TensorFlow is not fork-safe (its thread pools and device state do not survive
# fork), so each worker imports the app, and with it TensorFlow and the models, after the fork.
preload_app = False
timeout = 120  # A first request in a worker may build the backbone and load a model.
graceful_timeout = 30
keepalive = 5
accesslog = None  # The app logs one JSON line per request itself.
# No gunicornc control socket: it lives at one path in the home folder, which several
# instances (a test run beside `make run`) would fight over.
control_socket_disable = True

_metrics_dir_made: Path | None = None


def _prepare_metrics_dir() -> None:
    """Give prometheus-client's multiprocess mode an empty folder, inherited by every worker."""
    global _metrics_dir_made
    path = _settings.metrics_dir
    if path:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # Counts of an earlier run would be added to this one's.
            stale.unlink()
    else:
        # prometheus-client's own variable, read by the workers when they import it; it must be
        # set here, in the master, before the first worker is forked.
        _metrics_dir_made = Path(tempfile.mkdtemp(prefix="classifier-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir_made)


def on_starting(server) -> None:
    """Refuse to listen beyond loopback without API keys, then prepare the metrics folder."""
    check_bind(_settings, server.cfg.bind)
    _prepare_metrics_dir()


def child_exit(server, worker) -> None:
    """Mark a dead worker's metrics files, so its live gauges stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker) -> None:
    """Close what the exiting worker built: its prediction runtime (threads), job database and broker pool."""
    from service.extensions import close

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        close(app)


def on_exit(server) -> None:
    """Remove the metrics folder this config made."""
    if _metrics_dir_made is not None:
        shutil.rmtree(_metrics_dir_made, ignore_errors=True)
