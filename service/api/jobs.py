"""Training jobs: start one, list and follow them (JSON or server-sent events), cancel."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

from flask import Response, current_app, request, url_for

from service.api import Blueprint
from service.api.datasets import ARCHIVE_BODY, FILE_FIELD, store_upload
from service.api.schemas import ErrorSchema, JobEnvelopeSchema, JobListQuerySchema, JobListSchema, JobSchema
from service.auth import TRAIN, role
from service.errors import ServiceError, broker_unavailable
from service.extensions import get_celery, get_datasets, get_jobs
from service.inputs import MULTIPART
from training.errors import JobNotFoundError, Overloaded
from training.jobs.records import FINAL_STATUSES, QUEUED, JobStore, check_idempotency_key
from training.settings import Settings
from training.store import validate_name

bp = Blueprint("jobs", __name__, url_prefix="/v1", description="Training jobs")

HIDDEN = ("worker",)  # host names and process ids of the training machines stay private
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PARAMETER = {
    "in": "header", "name": IDEMPOTENCY_HEADER, "required": False,
    "description": "Any 1-255 printable ASCII characters (a UUID, say) naming this train request: a retry with the "
                   "same key (after a timeout or a 503) answers the job the first request recorded, and re-sends it "
                   "to the queue if it is still queued, instead of recording a second job. The same key with "
                   "another model, dataset or options answers 409.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7E]+$"},
}

TRAIN_BODY = {
    "required": True,
    "description": "JSON `{\"dataset\": id, ...options}`, or multipart with the archive as file part "
                   f"`{FILE_FIELD}` (or a `dataset` field) and the options as form fields (names as the CLI's "
                   "`python -m training train` flags: epochs, image_size, optimizer, learning_rate, fine_tune, ...).",
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["dataset"],
            "properties": {"dataset": {"type": "string"}}, "additionalProperties": True,
        }},
        MULTIPART: ARCHIVE_BODY["content"][MULTIPART],
    },
}


def job_url(job_id: str) -> str:
    return url_for("jobs.get_job", job_id=job_id)


def public(job: dict, url: str | None = None) -> dict:
    """A job as the API shows it: without the worker, with its URL."""
    shown = {key: value for key, value in job.items() if key not in HIDDEN}
    return {**shown, "url": url or job_url(job["id"])}


def train_request() -> tuple[str | None, dict, bool]:
    """The request's dataset id (None: an archive is attached), its options, and whether it is multipart."""
    if request.mimetype == MULTIPART:
        form = request.form.to_dict()
        dataset = form.pop("dataset", None)
        if FILE_FIELD not in request.files and not dataset:
            raise ServiceError(f"send the dataset archive as file field '{FILE_FIELD}', or a 'dataset' id field")
        return (None if FILE_FIELD in request.files else dataset), form, True
    if request.mimetype != "application/json":
        raise ServiceError("send application/json {\"dataset\": id, ...options}, or multipart/form-data with the "
                           f"archive as file field '{FILE_FIELD}'; received Content-Type {request.mimetype or 'none'}",
                           415)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ServiceError('the body must be a JSON object: {"dataset": "<id>", "epochs": 10, ...}')
    options = dict(body)
    dataset = options.pop("dataset", None)
    if not isinstance(dataset, str) or not dataset:
        raise ServiceError(f"dataset: a dataset id (string) is required, received: {dataset!r}")
    return dataset, options, False


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header, checked (a malformed one is InvalidInput: a 400); None when it has none."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    return None if key is None else check_idempotency_key(key)


def check_options(options: dict) -> dict:
    """Return the options with typed values; unknown options and bad values are InvalidInput (a 400 naming them)."""
    # training.options imports the pipeline and with it Keras: only when a job is started.
    from training.options import normalize_options, parse_options

    parse_options(options)
    return normalize_options(options)


@bp.route("/models/<name>/train", methods=["POST"])
@role(TRAIN)
@bp.doc(requestBody=TRAIN_BODY, parameters=[IDEMPOTENCY_PARAMETER])
@bp.response(202, JobEnvelopeSchema, description="Queued (or, for a known `Idempotency-Key`, that key's job): "
                                                 "follow `job.url`")
@bp.alt_response(400, schema=ErrorSchema, description="Bad model name, option, archive or Idempotency-Key, or a "
                                                      "dataset whose ingest failed")
@bp.alt_response(404, schema=ErrorSchema, description="No such dataset")
@bp.alt_response(409, schema=ErrorSchema, description="The Idempotency-Key was used for another model, dataset "
                                                      "or options")
@bp.alt_response(415, schema=ErrorSchema, description="Neither JSON nor multipart")
@bp.alt_response(503, schema=ErrorSchema, description="The broker is unavailable; the job stays queued (retry with "
                                                      "the same Idempotency-Key: no second job is recorded)")
def train(name: str):
    """Train a new version of a model on a dataset, as a queued job (once per Idempotency-Key).

    With an archive attached, the archive is stored and the job ingests it as its first phase.
    """
    name = validate_name(name)
    key = idempotency_key()
    dataset_id, options, _ = train_request()
    options = check_options(options)  # Every cheap check before an upload is stored or a job is recorded.
    uploaded = None
    if dataset_id is None:
        # Stored, not sent to the ingest queue: the job ingests it (or finds it ingested, by then).
        uploaded = store_upload()
        dataset_id = uploaded["id"]
    # 404 for an unknown dataset, 400 for a malformed id or one whose ingest failed (known failed now: else
    # the job fails with the dataset's message).
    get_datasets().trainable(dataset_id)
    # With a key already used: that key's job (409 when it was for another model, dataset or options).
    job = get_jobs().create(name, dataset_id, options, idempotency_key=key)
    url = job_url(job["id"])
    # A retried request's job may still wait for its message (the broker was down): send it again. A second
    # message for one job is harmless, the job runs once (JobStore.start).
    if job["status"] == QUEUED:
        send(job, url, key)
    body = {"job": public(job, url)}
    if uploaded is not None:
        body["dataset"] = uploaded
    return body, 202, {"Location": url}


def send(job: dict, url: str, key: str | None) -> None:
    """Send a queued job to the training queue; 503 with Retry-After when the broker is unavailable."""
    try:
        from training.jobs.app import enqueue

        enqueue(get_celery(), job["id"])
    except Exception as exc:  # The broker is down or unreachable: the job is recorded, its message is not.
        retry = ("a retry with the same Idempotency-Key returns this job and will not duplicate it" if key else
                 "this request had no Idempotency-Key header, so a retry records another job (send one: a retry "
                 "with the same Idempotency-Key will not duplicate the job)")
        raise broker_unavailable(exc, f"job {job['id']}", "training",
                                 f"It will be sent once the broker is back (the reconciler re-sends lost messages); "
                                 f"follow {url} or cancel it; {retry}", url) from None


@bp.route("/jobs", methods=["GET"])
@role(TRAIN)
@bp.arguments(JobListQuerySchema, location="query", as_kwargs=True)
@bp.response(200, JobListSchema)
def list_jobs(limit: int, status: str | None = None):
    """List training jobs, newest first."""
    return {"jobs": [public(job) for job in get_jobs().recent(limit=limit, status=status)]}


@bp.route("/jobs/<job_id>", methods=["GET"])
@role(TRAIN)
@bp.response(200, JobSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such job")
def get_job(job_id: str):
    """One job: status, progress, result or error."""
    return public(get_jobs().get(job_id))


@bp.route("/jobs/<job_id>/cancel", methods=["POST"])
@role(TRAIN)
@bp.response(202, JobSchema, description="A queued job is cancelled now; a running one stops within an epoch")
@bp.alt_response(404, schema=ErrorSchema, description="No such job")
def cancel(job_id: str):
    """Cancel a job: at once when queued, cooperatively (`cancel_requested`) when running."""
    return public(get_jobs().request_cancel(job_id))


def job_events(jobs: JobStore, job_id: str, url: str, *, poll_s: float = Settings.events_poll_s,
               keepalive_s: float = Settings.events_keepalive_s, lifetime_s: float = Settings.events_lifetime_s,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Server-sent events: `event: job` on every change, keep-alive comments, end after a final state."""
    started = last_sent = clock()
    previous = None
    while True:
        try:
            job = public(jobs.get(job_id), url)
        except JobNotFoundError:
            yield f"event: error\ndata: {json.dumps({'code': 'not_found', 'message': 'the job was deleted'})}\n\n"
            return
        text = json.dumps(job, separators=(",", ":"))
        now = clock()
        if text != previous:
            yield f"event: job\ndata: {text}\n\n"
            previous, last_sent = text, now
        if job["status"] in FINAL_STATUSES:
            return
        if now - started >= lifetime_s:
            yield ": stream lifetime reached; reconnect to follow the job\n\n"
            return
        if now - last_sent >= keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = now
        sleep(poll_s)


def stream_slots() -> threading.BoundedSemaphore:
    """This process's event-stream slots: each open stream holds a server thread, so at most half of
    them (EVENT_STREAMS, else THREADS // 2) may stream, and predictions always find a thread."""
    extensions = current_app.extensions
    if "event_streams" not in extensions:
        settings = current_app.config["SETTINGS"]
        limit = settings.event_streams or max(1, settings.threads // 2)
        extensions["event_streams"] = threading.BoundedSemaphore(limit)
    return extensions["event_streams"]


@bp.route("/jobs/<job_id>/events", methods=["GET"])
@role(TRAIN)
@bp.response(200, description="`text/event-stream`: `event: job` with the job JSON whenever it changes; "
                              "ends after a final state", content_type="text/event-stream")
@bp.alt_response(404, schema=ErrorSchema, description="No such job")
@bp.alt_response(503, schema=ErrorSchema, description="Too many open event streams: poll `GET /v1/jobs/{id}`")
def events(job_id: str):
    """Follow a job as server-sent events until it succeeds, fails or is cancelled."""
    jobs = get_jobs()
    jobs.get(job_id)  # 404 now, before the stream starts
    slots = stream_slots()
    if not slots.acquire(blocking=False):
        raise Overloaded("too many open event streams on this server; poll GET /v1/jobs/{id} instead", retry_after=5)
    settings = current_app.config["SETTINGS"]
    stream = job_events(jobs, job_id, job_url(job_id), poll_s=settings.events_poll_s,
                        keepalive_s=settings.events_keepalive_s, lifetime_s=settings.events_lifetime_s)
    # Proxies (nginx) must pass each event on at once rather than buffer the stream.
    response = Response(stream, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(slots.release)  # when the stream ends or the client goes away
    return response
