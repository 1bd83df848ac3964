"""Datasets: upload an archive of one folder per class, list and describe them."""

from __future__ import annotations

from flask import current_app, request, url_for

from service.api import Blueprint
from service.api.schemas import DatasetListSchema, DatasetSchema, ErrorSchema
from service.auth import TRAIN, role
from service.errors import ServiceError
from service.extensions import get_datasets
from service.inputs import MULTIPART
from training.ingest import IngestLimits

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


def upload_archive() -> dict:
    """Store the request's archive (multipart part `file`) as a dataset; return its record."""
    if request.mimetype and request.mimetype != MULTIPART:
        raise ServiceError(f"send multipart/form-data with the archive as file field '{FILE_FIELD}'; received "
                           f"Content-Type {request.mimetype}", 415)
    part = request.files.get(FILE_FIELD)
    if part is None:
        raise ServiceError(f"no archive: send a .zip or .tar.gz as the multipart file field '{FILE_FIELD}'")
    settings = current_app.config["SETTINGS"]
    # ArchiveError / DatasetError are InvalidInput: service.errors answers them with a 400.
    return get_datasets().add_archive(part.stream, IngestLimits.from_settings(settings),
                                      settings.max_upload_mb * 2**20, part.filename)


@bp.route("", methods=["POST"])
@role(TRAIN)
@bp.doc(requestBody=ARCHIVE_BODY)
@bp.response(201, DatasetSchema, description="Stored: the ingest report")
@bp.alt_response(200, schema=DatasetSchema, description="The same bytes were uploaded before (`existing`: true)")
@bp.alt_response(400, schema=ErrorSchema, description="No file, an unsafe or corrupt archive, or too few classes")
@bp.alt_response(413, schema=ErrorSchema, description="Upload over MAX_UPLOAD_MB")
@bp.alt_response(415, schema=ErrorSchema, description="Not multipart/form-data")
def upload():
    """Upload a dataset archive; it is unpacked safely, validated and deduplicated."""
    record = with_url(upload_archive())
    if record.get("existing"):
        return record, 200
    return record, 201, {"Location": record["url"]}


@bp.route("", methods=["GET"])
@role(TRAIN)
@bp.response(200, DatasetListSchema)
def list_datasets():
    """List the uploaded datasets, newest first."""
    return {"datasets": [with_url(record) for record in get_datasets().list()]}


@bp.route("/<dataset_id>", methods=["GET"])
@role(TRAIN)
@bp.response(200, DatasetSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such dataset")
def describe(dataset_id: str):
    """Describe one dataset: classes and counts, skipped files, duplicates, warnings."""
    return with_url(get_datasets().get(dataset_id))  # a malformed id is InvalidInput: a 400
