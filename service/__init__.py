"""The prediction service: a Flask application factory.

Config comes from the defaults below, then the settings (`Settings.from_env()`, the
only reader of the environment), then the test override. Tests inject settings with
`create_app({"SETTINGS": Settings(...)})`.
"""

from __future__ import annotations

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from training.settings import Settings

MIB = 2**20
DEFAULT_CONFIG = {
    "MAX_IMAGES_PER_REQUEST": 64,
    "MAX_MODELS_PER_REQUEST": 16,
    # Werkzeug's form limits: non-file fields held in memory, and parts per body. Parts are
    # allowed past MAX_IMAGES_PER_REQUEST so that "too many images" is a 400 that says so.
    "MAX_FORM_MEMORY_SIZE": 1 * MIB,
    "MAX_FORM_PARTS": 256,
}


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, where a body nested too deeply to parse is invalid JSON (a 400), not a RecursionError (a 500)."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def settings_config(settings: Settings) -> dict:
    """Flask config derived from the settings."""
    return {"SETTINGS": settings, "MAX_CONTENT_LENGTH": settings.max_upload_mb * MIB}


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure the service's Flask app."""
    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.json.sort_keys = False  # Keep the documented order: {"model", "version", "predictions"}.
    app.config.from_mapping(DEFAULT_CONFIG)
    settings = (test_config or {}).get("SETTINGS") or Settings.from_env()
    app.config.from_mapping(settings_config(settings))
    if test_config:
        app.config.from_mapping(test_config)

    from service import auth, errors, jobs_ext, logs, metrics, openapi, runtime_ext, web

    # Order matters: timing and request ids start before auth may answer early.
    logs.init_app(app)
    metrics.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    runtime_ext.init_app(app)
    jobs_ext.init_app(app)
    openapi.init_app(app)
    web.init_app(app)
    return app
