"""The Celery app factory and how work is sent: broker, queues, task names, delivery settings.

Two queues, each with its own workers: `training` (a job id: one GPU job at a time per worker; and
exports of model versions, which need TensorFlow too) and `ingest` (a dataset id: unpack and check an
upload, on CPUs, without TensorFlow), so a long training never holds an upload back. The job record
in `JobStore` and the dataset record in `DatasetStore` are the sources of truth; the broker only
carries ids.
`make_celery` only configures: it connects nowhere and makes no folder. The embedded broker's
folders are made when first needed, by `make_broker_folders`: when a worker starts, and in
`enqueue` before a message is sent (by the API or the reconciler).
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from training.settings import Settings

QUEUE = "training"
# The name every message carries. It is the name the task had when it lived in `training.tasks`:
# keep it, or messages queued before an upgrade would find no task to run them.
TASK_NAME = "training.train_model"
INGEST_QUEUE = "ingest"
INGEST_TASK_NAME = "training.ingest_dataset"
# Exports (SavedModel, ONNX, TFLite) need TensorFlow and a minute of CPU: the training workers make them.
EXPORT_TASK_NAME = "training.export_version"
# Imported by a worker when it starts (not by the factory): it registers the task.
TASKS_MODULE = "training.jobs.tasks"
# A job runs for hours at most; the soft limit lets it record "failed", the hard one kills it.
SOFT_TIME_LIMIT_S = 6 * 3600
TIME_LIMIT_S = SOFT_TIME_LIMIT_S + 5 * 60
# Redis redelivers an unacked message after this long; it must outlast the longest job, or a
# second worker would pick the job up while the first still runs it.
VISIBILITY_TIMEOUT_S = TIME_LIMIT_S + 3600
# How often a worker on the embedded broker looks for new messages.
POLL_S = 0.2
# The transport options naming the embedded broker's folders that must exist before it is used
# (kombu makes its control folder itself).
BROKER_FOLDERS = ("data_folder_in", "processed_folder")


def _broker(settings: Settings) -> tuple[str, dict]:
    """The broker URL and transport options: the configured broker, or folders under DATA_DIR when none is."""
    if settings.celery_broker_url:
        return settings.celery_broker_url, {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    # Single machine, no server to run: messages are files in a shared folder (one for both queues),
    # looked for five times a second so an upload's ingest starts at once (kombu's default is 1 s).
    root = settings.data_dir / "broker"
    queue_folder = str(root / "queue")
    return "filesystem://", {"data_folder_in": queue_folder, "data_folder_out": queue_folder,
                             "processed_folder": str(root / "processed"), "store_processed": False,
                             "control_folder": str(root / "control"), "polling_interval": POLL_S}


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for training jobs and dataset ingests (nothing is connected or created)."""
    broker, transport_options = _broker(settings)
    app = Celery("training", include=[TASKS_MODULE])
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Job state lives in JobStore; nothing reads Celery results.
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={TASK_NAME: {"queue": QUEUE}, INGEST_TASK_NAME: {"queue": INGEST_QUEUE},
                     EXPORT_TASK_NAME: {"queue": QUEUE}},
        # A GPU job takes minutes to hours: ack after it ran, take one at a time, and give the
        # message back when the worker dies mid-job (JobStore.start makes the rerun safe; the
        # dataset's ingest lock makes a rerun of an ingest wait for, or redo, the first one).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A fresh child per job: TensorFlow frees GPU memory only when its process exits (and an
        # ingest's memory, decoding thousands of images, goes back too).
        worker_max_tasks_per_child=1,
        # A child that starts slowly on a busy machine must not be taken for a hung one: past Celery's
        # default 4 s it would be killed and another forked, forever.
        worker_proc_alive_timeout=120,
        task_soft_time_limit=SOFT_TIME_LIMIT_S,
        task_time_limit=TIME_LIMIT_S,
    )
    return app


def make_broker_folders(app: Celery) -> None:
    """Make the embedded broker's folders if they are missing; a broker server needs none."""
    options = app.conf.broker_transport_options or {}
    for name in BROKER_FOLDERS:
        if name in options:
            Path(options[name]).mkdir(parents=True, exist_ok=True)


def enqueue(app: Celery, job_id: str) -> None:
    """Send a job to the training queue."""
    make_broker_folders(app)
    # The task id is the job id, so the reconciler can revoke (kill) a job's run knowing only the job.
    app.send_task(TASK_NAME, args=[job_id], queue=QUEUE, task_id=job_id)


def enqueue_ingest(app: Celery, dataset_id: str) -> None:
    """Send a stored dataset to the ingest queue."""
    make_broker_folders(app)
    app.send_task(INGEST_TASK_NAME, args=[dataset_id], queue=INGEST_QUEUE)


def enqueue_export(app: Celery, name: str, version: int, fmt: str) -> None:
    """Send an export of a model version to the training queue (its workers have TensorFlow)."""
    make_broker_folders(app)
    app.send_task(EXPORT_TASK_NAME, args=[name, version, fmt], queue=QUEUE)
