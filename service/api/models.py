"""The model registry: list, describe, plots, publish / roll back, delete versions."""

from __future__ import annotations

from pathlib import Path

from flask import send_from_directory, url_for

from service.api import Blueprint
from service.api.schemas import (
    ErrorSchema,
    ModelListSchema,
    ModelSchema,
    PublishedSchema,
    PublishSchema,
    VersionDetailSchema,
)
from service.auth import PREDICT, TRAIN, role
from service.extensions import get_exports, get_store
from training.errors import ModelNotFoundError, NotFound
from training.store import validate_name

bp = Blueprint("models", __name__, url_prefix="/v1/models", description="Stored models and their versions")


def plots_dir(name: str, version: int) -> Path:
    """A version's plots folder (404 if the version does not exist)."""
    return get_store().version_dir(name, version) / "plots"


def plot_files(name: str, version: int) -> list[str]:
    """Names of the PNG plots stored with a version."""
    folder = plots_dir(name, version)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".png")


def summary(name: str) -> dict:
    """One line of the model list: versions, published version, its classes and accuracy."""
    store = get_store()
    versions = store.versions(name)
    if not versions:
        raise ModelNotFoundError(f"no model named {name!r}")
    published = store.published_version(name)
    shown = store.metadata(name, published if published is not None else versions[-1])
    return {"name": name, "versions": versions, "published": published, "classes": shown.get("classes", []),
            "accuracy": shown.get("metrics", {}).get("accuracy") if published is not None else None,
            "url": url_for("models.describe", name=name)}


def summary_or_none(name: str) -> dict | None:
    """A model's summary, or None if it was deleted while the list was being read."""
    try:
        return summary(name)
    except ModelNotFoundError:
        return None


@bp.route("", methods=["GET"])
@role(PREDICT)
@bp.response(200, ModelListSchema)
def list_models():
    """List the stored models."""
    return {"models": [line for line in map(summary_or_none, get_store().names()) if line]}


@bp.route("/<name>", methods=["GET"])
@role(PREDICT)
@bp.response(200, ModelSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such model")
def describe(name: str):
    """Describe one model: every version's metrics, classes, params and plot URLs (and TF Serving's status)."""
    return description(validate_name(name))


def description(name: str) -> dict:
    """A model's description, each version with its plot URLs."""
    model = get_store().describe(name)
    for version in model["versions"]:
        version["plots"] = {file: url_for("models.plot", name=name, version=version["version"], filename=file)
                            for file in plot_files(name, version["version"])}
    model["model_version_status"] = [version_status(v["version"]) for v in reversed(model["versions"])]
    return model


def version_status(version: int) -> dict:
    """A stored version as TF Serving's model status reads: available (it is loaded on first use)."""
    return {"version": str(version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


@bp.route("/<name>/versions/<int:version>", methods=["GET"])
@role(PREDICT)
@bp.response(200, VersionDetailSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such model or version")
def describe_version(name: str, version: int):
    """Describe one version (as in the model's description), with TF Serving's status of it."""
    store = get_store()
    store.resolve_version(validate_name(name), version)
    found = next(v for v in description(name)["versions"] if v["version"] == version)
    return {**found, "model_version_status": [version_status(version)]}


@bp.route("/<name>/versions/<int:version>/plots/<filename>", methods=["GET"])
@role(PREDICT)
@bp.response(200, description="The PNG image", content_type="image/png")
@bp.alt_response(404, schema=ErrorSchema, description="No such model, version or plot")
def plot(name: str, version: int, filename: str):
    """Serve one plot (training curves, confusion matrix) of a version."""
    if filename not in plot_files(validate_name(name), version):  # Only files listed there: no path tricks.
        raise NotFound(f"version {version} of {name!r} has no plot {filename!r}")
    return send_from_directory(plots_dir(name, version), filename, mimetype="image/png", max_age=300)


@bp.route("/<name>/published", methods=["PUT"])
@role(TRAIN)
@bp.arguments(PublishSchema)
@bp.response(200, PublishedSchema)
@bp.alt_response(404, schema=ErrorSchema, description="No such model or version")
def publish(body: dict, name: str):
    """Publish a version, or roll back to an earlier one, atomically."""
    store = get_store()
    store.resolve_version(validate_name(name), body["version"])  # 404 before the store's lock makes any folder.
    store.publish(name, body["version"])
    return {"name": name, "published": body["version"]}


@bp.route("/<name>/versions/<int:version>", methods=["DELETE"])
@role(TRAIN)
@bp.response(204)
@bp.alt_response(404, schema=ErrorSchema, description="No such model or version")
@bp.alt_response(409, schema=ErrorSchema, description="The version is the published one")
def delete_version(name: str, version: int):
    """Delete a version that is not the published one."""
    store = get_store()
    store.resolve_version(validate_name(name), version)  # 404 before the store's lock makes any folder.
    store.delete_version(name, version)
    get_exports().discard(name, version)
    return None
