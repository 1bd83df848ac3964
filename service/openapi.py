"""OpenAPI 3 generated from the code (flask-smorest), and Swagger UI served from this server.

The Swagger UI files come from the `flask-swagger-ui` package's `dist/` folder and are
served by a local route: the service runs without internet, so no CDN.
"""

from __future__ import annotations

import json
from importlib.resources import files

import flask_smorest
from flask import Blueprint as FlaskBlueprint
from flask import Flask, send_from_directory
from webargs.flaskparser import FlaskParser

from service.api.schemas import ErrorSchema

DOCS_ASSETS_URL = "/docs/assets/"
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "training or prediction API key"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
OPENAPI_CONFIG = {
    "API_TITLE": "Image classifier",
    "API_VERSION": "v1",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": DOCS_ASSETS_URL,
    "API_SPEC_OPTIONS": {
        "info": {"description": "Self-hosted transfer-learning image classification. "
                                "Errors are `{\"error\": {\"code\", \"message\"}}`."},
        "components": {"securitySchemes": SECURITY_SCHEMES},
        "security": [{"bearer": []}, {"apiKey": []}],
    },
}


class ArgumentsParser(FlaskParser):
    """webargs parser answering invalid arguments with 400 (the API's bad-input status), not 422."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        """The JSON body; one nested too deeply to parse is invalid JSON (a 400), not a RecursionError (a 500)."""
        try:
            return super()._raw_load_json(req)
        except RecursionError:
            # A non-empty document: webargs takes an error on an empty one for "no body".
            raise json.JSONDecodeError("JSON nested too deeply", "[[...", 0) from None


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest blueprint whose argument errors are 400s."""

    ARGUMENTS_PARSER = ArgumentsParser()


class Api(flask_smorest.Api):
    """flask-smorest Api that leaves error answers to `service.errors` (one handler, one shape)."""

    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        """Register nothing: `service.errors.init_app` handles every error."""


def swagger_ui_dist() -> str:
    """Folder of the Swagger UI files shipped in the flask-swagger-ui package."""
    return str(files("flask_swagger_ui") / "dist")


def docs_assets_blueprint() -> FlaskBlueprint:
    """Blueprint serving the Swagger UI files under /docs/assets/."""
    bp = FlaskBlueprint("docs_assets", __name__, url_prefix=DOCS_ASSETS_URL.rstrip("/"))

    @bp.route("/<path:filename>")
    def asset(filename: str):
        """Serve one Swagger UI file (send_from_directory refuses paths outside the folder)."""
        return send_from_directory(swagger_ui_dist(), filename, max_age=3600)

    return bp


def init_app(app: Flask) -> Api:
    """Register the API blueprints, /openapi.json, /docs and the Swagger UI files."""
    from service.api import datasets, health, jobs, models, predict

    for key, value in OPENAPI_CONFIG.items():
        app.config.setdefault(key, value)
    api = Api(app)
    for module in (health, models, predict, datasets, jobs):
        api.register_blueprint(module.bp)
    app.register_blueprint(docs_assets_blueprint())
    app.extensions["api"] = api
    return api
