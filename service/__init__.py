"""The prediction service: a Flask application factory.

Config comes from the defaults below, then the settings (`Settings.from_env()`, the
only reader of the environment), then the test override. Tests inject settings with
`create_app({"SETTINGS": Settings(...)})`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.settings import Settings

if TYPE_CHECKING:  # Flask is imported by create_app: `service.runtime` and its batcher import no Flask.
    from flask import Flask

MIB = 2**20
DEFAULT_CONFIG = {
    "MAX_IMAGES_PER_REQUEST": 64,
    "MAX_MODELS_PER_REQUEST": 16,
    # Werkzeug's form limits: non-file fields held in memory, and parts per body. Parts are
    # allowed past MAX_IMAGES_PER_REQUEST so that "too many images" is a 400 that says so.
    "MAX_FORM_MEMORY_SIZE": 1 * MIB,
    "MAX_FORM_PARTS": 256,
}


def settings_config(settings: Settings) -> dict:
    """Flask config derived from the settings."""
    return {"SETTINGS": settings, "MAX_CONTENT_LENGTH": settings.max_upload_mb * MIB}


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure the service's Flask app."""
    from flask import Flask

    from service.api import (
        JSONProvider,
        datasets,
        exports,
        health,
        inference_v2,
        jobs,
        models,
        predict,
        tfserving,
    )

    app = Flask(__name__)
    app.json = JSONProvider(app)
    app.json.sort_keys = False  # Keep the documented order: {"model", "version", "predictions"}.
    app.config.from_mapping(DEFAULT_CONFIG)
    settings = (test_config or {}).get("SETTINGS") or Settings.from_env()
    app.config.from_mapping(settings_config(settings))
    if test_config:
        app.config.from_mapping(test_config)

    from service import auth, errors, extensions, logs, metrics, openapi, web

    # Order matters: timing and request ids start before auth may answer early.
    logs.init_app(app)
    metrics.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    extensions.init_app(app)
    api = openapi.init_app(app)
    # The order of /openapi.json's paths.
    for resource in (health, models, predict, datasets, jobs, exports, tfserving, inference_v2):
        api.register_blueprint(resource.bp)
    web.init_app(app)
    return app
