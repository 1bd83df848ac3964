"""The Celery app factory and sending: settings, no folder until needed, the task's name, the job id as task id."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tests.training.jobs.helpers import REDIS_URL
from training.jobs.app import (
    INGEST_QUEUE,
    INGEST_TASK_NAME,
    QUEUE,
    TASK_NAME,
    enqueue,
    enqueue_ingest,
    make_broker_folders,
    make_celery,
)


def test_make_celery_settings(settings):
    app = make_celery(dataclasses.replace(settings, celery_broker_url=REDIS_URL))
    conf = app.conf
    assert conf.broker_url == REDIS_URL and conf.task_ignore_result and conf.task_acks_late
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.task_reject_on_worker_lost and conf.worker_concurrency == 1
    assert conf.task_default_queue == QUEUE and conf.task_routes[TASK_NAME] == {"queue": QUEUE}
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit
    make_broker_folders(app)  # a broker server needs no folder
    assert not settings.data_dir.exists()

    embedded = make_celery(settings)
    folders = [Path(embedded.conf.broker_transport_options[name]) for name in ("data_folder_in", "processed_folder")]
    assert embedded.conf.broker_url == "filesystem://"
    assert not settings.data_dir.exists()  # the factory makes nothing: a starting worker or a sender does
    make_broker_folders(embedded)
    assert all(folder.is_dir() for folder in folders)


def test_a_worker_runs_the_task_under_the_name_queued_messages_carry(settings):
    # The name of the task from before the job system became a package: messages queued then must still run.
    assert TASK_NAME == "training.train_model"
    app = make_celery(settings)
    app.loader.import_default_modules()  # what a worker does when it starts: import the app's task module
    assert app.tasks[TASK_NAME].name == TASK_NAME
    assert app.tasks[TASK_NAME].__module__ == "training.jobs.tasks"


def test_enqueue_sends_the_job_id_as_the_task_id(settings):
    app = make_celery(settings)
    enqueue(app, "0123456789abcdef0123456789abcdef")
    (message,) = Path(app.conf.broker_transport_options["data_folder_in"]).iterdir()
    headers = json.loads(message.read_text())["headers"]
    assert headers["id"] == "0123456789abcdef0123456789abcdef" and headers["task"] == TASK_NAME


def test_ingests_go_to_their_own_queue_with_the_dataset_id(settings):
    app = make_celery(settings)
    assert app.conf.task_routes[INGEST_TASK_NAME] == {"queue": INGEST_QUEUE} != app.conf.task_routes[TASK_NAME]
    app.loader.import_default_modules()
    assert app.tasks[INGEST_TASK_NAME].__module__ == "training.jobs.tasks"
    enqueue_ingest(app, "0123456789abcdef")
    (message,) = Path(app.conf.broker_transport_options["data_folder_in"]).iterdir()
    assert message.name.endswith(f".{INGEST_QUEUE}.msg")  # the embedded broker keeps queues apart by name
    assert json.loads(message.read_text())["headers"]["task"] == INGEST_TASK_NAME
