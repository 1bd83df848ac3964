"""Prediction: one model, or several models on the same images (one backbone pass)."""

from __future__ import annotations

from flask import current_app, request

from service.api import Blueprint
from service.api.schemas import (
    ErrorSchema,
    PredictionsSchema,
    PredictManyQuerySchema,
    PredictManySchema,
    PredictQuerySchema,
)
from service.auth import PREDICT, role
from service.errors import ServiceError, limit_body
from service.extensions import get_runtime
from service.inputs import FIELD, InstancesSchema, read_images
from training.store import validate_name

bp = Blueprint("predict", __name__, url_prefix="/v1", description="Classify images")

IMAGES_BODY = {
    "required": True,
    "description": f"Images as repeatable multipart file parts named `{FIELD}`, or JSON base64 instances.",
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }},
        "application/json": {"schema": InstancesSchema},
    },
}
ERRORS = {400: "Bad input: no images, too many, an empty part, bad base64, bad query",
          404: "No such model or version", 413: "Request body over MAX_PREDICT_MB",
          415: "Not an image, or not multipart/JSON",
          503: "Overloaded or timed out (see Retry-After), weights missing, or the runtime not ready"}


@bp.before_request
def limit_prediction_bodies() -> None:
    """Prediction bodies get their own limit, well under the dataset uploads' (MAX_PREDICT_MB)."""
    limit_body(current_app.config["SETTINGS"].max_predict_mb, "MAX_PREDICT_MB")


def document_errors(view):
    """Document the error answers every predict endpoint can give."""
    for status, description in ERRORS.items():
        view = bp.alt_response(status, schema=ErrorSchema, description=description)(view)
    return view


def request_images() -> list[bytes]:
    """The request's images, within the per-request limit."""
    return read_images(request, current_app.config["MAX_IMAGES_PER_REQUEST"])


def model_names(text: str) -> list[str]:
    """Comma-separated model names, checked, in order, without repeats."""
    names = list(dict.fromkeys(validate_name(part.strip()) for part in text.split(",") if part.strip()))
    limit = current_app.config["MAX_MODELS_PER_REQUEST"]
    if not names:
        raise ServiceError("models: name at least one model, e.g. ?models=parts,defects")
    if len(names) > limit:
        raise ServiceError(f"models: at most {limit} models per request, received {len(names)}")
    return names


@bp.route("/models/<name>/predict", methods=["POST"])
@role(PREDICT)
@bp.arguments(PredictQuerySchema, location="query", as_kwargs=True)
@bp.doc(requestBody=IMAGES_BODY)
@bp.response(200, PredictionsSchema)
@document_errors
def predict(name: str, top_k: int, version: int | None = None):
    """Classify images with one model (its published version unless `version` is given)."""
    name, images = validate_name(name), request_images()  # Bad input is answered before the runtime is built.
    return get_runtime().predict(name, images, version=version, top_k=top_k)


@bp.route("/predict", methods=["POST"])
@role(PREDICT)
@bp.arguments(PredictManyQuerySchema, location="query", as_kwargs=True)
@bp.doc(requestBody=IMAGES_BODY)
@bp.response(200, PredictManySchema)
@document_errors
def predict_many(models: str, top_k: int):
    """Classify the same images with several models (published versions), sharing the backbone pass."""
    names, images = model_names(models), request_images()
    return get_runtime().predict_many(names, images, top_k=top_k)
