"""What a worker loads: `celery -A training.jobs.worker worker -Q training --concurrency 1` (training,
one worker per GPU) or `celery -A training.jobs.worker worker -Q ingest -n ingest@%h` (dataset ingest, CPU only).

Building the app only reads the settings: the embedded broker's folders are
made when the worker starts, and the task module is imported then (the app's `include`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery.signals import celeryd_init, worker_init
from celery.utils.text import str_to_list

from training.jobs.app import INGEST_QUEUE, make_broker_folders, make_celery
from training.settings import get_settings

if TYPE_CHECKING:
    from celery.app.utils import Settings as CeleryConf
    from celery.worker import WorkController

# Ingests one child process serves before it is replaced. A training child runs one job, so that
# TensorFlow gives its GPU memory back; an ingest child holds no GPU memory, and a fresh one per
# ingest would only import the image libraries again every time.
INGEST_TASKS_PER_CHILD = 100

app = make_celery(get_settings())


@celeryd_init.connect
def _reuse_ingest_children(conf: CeleryConf, options: dict, **_) -> None:
    """Let a worker that consumes only the ingest queue keep its children for many ingests."""
    if str_to_list(options.get("queues")) == [INGEST_QUEUE]:
        conf.worker_max_tasks_per_child = INGEST_TASKS_PER_CHILD


@worker_init.connect
def _make_broker_folders(sender: WorkController, **_) -> None:
    """Make the embedded broker's folders before the worker first reads them."""
    make_broker_folders(sender.app)
