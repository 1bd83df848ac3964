"""What a training worker loads: `celery -A training.jobs.worker worker -Q training --concurrency 1`.

One worker per GPU. Building the app only reads the settings: the embedded broker's folders are
made when the worker starts, and the task module is imported then (the app's `include`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery.signals import worker_init

from training.jobs.app import make_broker_folders, make_celery
from training.settings import get_settings

if TYPE_CHECKING:
    from celery.worker import WorkController

app = make_celery(get_settings())


@worker_init.connect
def _make_broker_folders(sender: WorkController, **_) -> None:
    """Make the embedded broker's folders before the worker first reads them."""
    make_broker_folders(sender.app)
