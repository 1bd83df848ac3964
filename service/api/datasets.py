"""Datasets: upload an archive of one folder per class (ingested by a worker), list and describe them."""

from __future__ import annotations

from flask import current_app, request, url_for

from service.api import Blueprint
from service.api.schemas import DatasetListSchema, DatasetSchema, ErrorSchema
from service.auth import TRAIN, role
from service.errors import ServiceError, broker_unavailable
from service.extensions import get_celery, get_datasets
from service.inputs import MULTIPART
from training.data.store import QUEUED

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets", description="Uploaded training datasets")

FILE_FIELD = "file"
ARCHIVE_BODY = {
    "required": True,
    "description": f"A .zip or .tar.gz of one folder per class, as the multipart file part `{FILE_FIELD}`.",
    "content": {MULTIPART: {"schema": {
        "type": "object", "required": [FILE_FIELD],
        "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
    }}},
}


def with_url(record: dict) -> dict:
    """A dataset record with its URL."""
    return {**record, "url": url_for("datasets.describe", dataset_id=record["id"])}


def store_upload() -> dict:
    """Store the request's archive (multipart part `file`) by content; return its record with its URL.

    Only streams, hashes and sniffs the first bytes: no image is decoded in the web process.
    """
    if request.mimetype and request.mimetype != MULTIPART:
        raise ServiceError(f"send multipart/form-data with the archive as file field '{FILE_FIELD}'; received "
                           f"Content-Type {request.mimetype}", 415)
    part = request.files.get(FILE_FIELD)
    if part is None:
        raise ServiceError(f"no archive: send a .zip or .tar.gz as the multipart file field '{FILE_FIELD}'")
    # ArchiveError (over the size limit, not an archive) is InvalidInput: service.errors answers it with a 400.
    max_bytes = current_app.config["SETTINGS"].max_upload_mb * 2**20
    return with_url(get_datasets().add_archive(part.stream, max_bytes, part.filename))


def send_ingest(record: dict) -> None:
    """Send a queued dataset to the ingest queue; 503 with Retry-After when the broker is unavailable."""
    try:
        from training.jobs.app import enqueue_ingest

        enqueue_ingest(get_celery(), record["id"])
    except Exception as exc:  # The broker is down or unreachable: the dataset is stored, its message is not.
        raise broker_unavailable(
            exc, f"dataset {record['id']}", "ingest",
            f"It will be ingested once the broker is back (the reconciler re-sends lost messages); follow "
            f"{record['url']}; uploading the same file again answers this dataset and sends it again",
            record["url"]) from None


@bp.route("", methods=["POST"])
@role(TRAIN)
@bp.doc(requestBody=ARCHIVE_BODY)
@bp.response(202, DatasetSchema, description="Stored and queued for ingest: follow `url` until `status` is "
                                             "`ready` (with the report) or `failed` (with the `error`)")
@bp.alt_response(200, schema=DatasetSchema, description="The same bytes were uploaded before (`existing`: true), "
                                                        "with their current status")
@bp.alt_response(400, schema=ErrorSchema, description="No file, or one that is not a .zip or .tar.gz")
@bp.alt_response(413, schema=ErrorSchema, description="Upload over MAX_UPLOAD_MB")
@bp.alt_response(415, schema=ErrorSchema, description="Not multipart/form-data")
@bp.alt_response(503, schema=ErrorSchema, description="The broker is unavailable; the dataset is stored and stays "
                                                      "queued until it is back")
def upload():
    """Upload a dataset archive: stored at once, then unpacked safely, checked and deduplicated by an ingest worker."""
    record = store_upload()
    if record["status"] == QUEUED:  # also an earlier upload whose message may have been lost: a second is harmless
        send_ingest(record)
    return record, 200 if record["existing"] else 202, {"Location": record["url"]}


@bp.route("", methods=["GET"])
@role(TRAIN)
@bp.response(200, DatasetListSchema)
def list_datasets():
    """List the uploaded datasets, newest first, each with its status."""
    return {"datasets": [with_url(record) for record in get_datasets().list()]}


@bp.route("/<dataset_id>", methods=["GET"])
@role(TRAIN)
@bp.response(200, DatasetSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such dataset")
def describe(dataset_id: str):
    """Describe one dataset: its status, then classes and counts, skipped files, duplicates, warnings, or its error."""
    return with_url(get_datasets().get(dataset_id))  # a malformed id is InvalidInput: a 400
