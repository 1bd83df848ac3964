"""Exports: a model version as one self-contained SavedModel, ONNX, TFLite or Keras model, in a .tar.gz.

Made by a training worker, never in the web process (converting VGG19 takes up to a minute): the
first GET answers 202 and asks for it, later GETs answer 202 while it is made, then stream the archive.
"""

from __future__ import annotations

from flask import send_file, url_for

from service.api import Blueprint
from service.api.schemas import ErrorSchema, ExportQuerySchema, ExportStatusSchema
from service.auth import TRAIN, role
from service.errors import ServiceError, broker_unavailable
from service.extensions import get_celery, get_exports
from training.exports import RETRY_AFTER_FAILURE_S, archive_name
from training.store import validate_name

bp = Blueprint("exports", __name__, url_prefix="/v1/models", description="Export model versions")

# How long a client is told to wait before asking again while an export is made.
POLL_S = 5


def pending(name: str, version: int, fmt: str, status: str):
    """The 202 answer while the export is queued or made: poll the same URL."""
    url = url_for("exports.export", name=name, version=version, format=fmt)
    body = {"export": {"model": name, "version": version, "format": fmt, "status": status, "url": url}}
    return body, 202, {"Retry-After": str(POLL_S), "Location": url}


def send_request(name: str, version: int, fmt: str) -> None:
    """Ask a training worker for the export; 503 with Retry-After when the broker is unavailable."""
    get_exports().request(name, version, fmt)
    url = url_for("exports.export", name=name, version=version, format=fmt)
    try:
        from training.jobs.app import enqueue_export

        enqueue_export(get_celery(), name, version, fmt)
    except Exception as exc:  # The broker is down: the request is recorded; a GET later sends it again.
        raise broker_unavailable(exc, f"the {fmt} export of {name!r} v{version}", "training",
                                 f"Ask again later ({url}): a request whose message was lost is sent again.",
                                 url) from None


@bp.route("/<name>/versions/<int:version>/export", methods=["GET"])
@role(TRAIN)
@bp.arguments(ExportQuerySchema, location="query", as_kwargs=True)
@bp.response(200, description="The export as a .tar.gz (model, labels.txt, README.md)",
             content_type="application/gzip")
@bp.alt_response(202, schema=ExportStatusSchema, description="Being made by a worker: ask again after Retry-After")
@bp.alt_response(404, schema=ErrorSchema, description="No such model or version")
@bp.alt_response(503, schema=ErrorSchema, description="The export failed (the message says why), or the broker "
                                                      "is unavailable")
def export(name: str, version: int, format: str):  # noqa: A002 - the query parameter's name
    """Download a version as one self-contained model: SavedModel, ONNX, TFLite or Keras (training key)."""
    exports = get_exports()
    state = exports.state(validate_name(name), version, format)
    if state["status"] == "ready":
        return send_file(exports.archive(name, version, format), mimetype="application/gzip", as_attachment=True,
                         download_name=archive_name(name, version, format), conditional=True, max_age=0)
    if state["status"] == "failed":
        raise ServiceError(f"the {format} export of {name!r} v{version} failed: {state['error']}; "
                           f"asking again after {RETRY_AFTER_FAILURE_S} s tries again", 503, "export_failed",
                           {"Retry-After": str(RETRY_AFTER_FAILURE_S)})
    if state["status"] == "missing":
        send_request(name, version, format)
        return pending(name, version, format, "queued")
    return pending(name, version, format, state["status"])
