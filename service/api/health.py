"""Liveness and readiness probes."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from flask import current_app

from service.api import Blueprint
from service.api.schemas import HealthSchema, ReadinessSchema
from service.auth import PUBLIC, role
from service.extensions import get_runtime, get_store

bp = Blueprint("health", __name__, description="Liveness and readiness")
logger = logging.getLogger(__name__)


def store_check(root: Path) -> str:
    """`ok` if the model store folder can be read and written, else why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        next(iter(root.iterdir()), None)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-"):
            pass
    except OSError as exc:
        return f"model store {root} is not readable and writable: {exc.strerror or exc}"
    return "ok"


def runtime_checks() -> dict[str, str]:
    """The prediction runtime's own readiness, component by component."""
    try:
        return dict(get_runtime().readiness())
    except Exception as exc:  # Readiness must answer, whatever broke: the reason is the answer.
        logger.warning("runtime readiness failed: %s", exc)
        return {"runtime": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"}


def readiness() -> tuple[dict[str, str], str]:
    """Each component's state (`ok` or why not), and one line naming those that are not ready ("" if none)."""
    settings = current_app.config["SETTINGS"]
    checks = {"model_store": store_check(Path(settings.model_dir))}
    if settings.shared:  # the object store and the job database every host shares (STORE_URL)
        checks["shared_store"] = get_store().readiness()
    checks |= runtime_checks()
    return checks, "; ".join(f"{name}: {reason}" for name, reason in checks.items() if reason != "ok")


@bp.route("/healthz", methods=["GET"])
@role(PUBLIC)
@bp.doc(security=[])
@bp.response(200, HealthSchema)
def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@bp.route("/readyz", methods=["GET"])
@role(PUBLIC)
@bp.doc(security=[])
@bp.response(200, ReadinessSchema)
@bp.alt_response(503, schema=ReadinessSchema, description="Not ready: `checks` says why")
def readyz():
    """Readiness: the model store is usable and the prediction runtime is ready."""
    checks, message = readiness()
    if not message:
        return {"status": "ready", "checks": checks}
    body = {"status": "not_ready", "checks": checks, "error": {"code": "not_ready", "message": message}}
    return body, 503, {"Retry-After": "5"}
