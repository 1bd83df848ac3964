"""OpenAPI 3 generated from the code (flask-smorest), and Swagger UI served from this server.

The Swagger UI files come from the `flask-swagger-ui` package's `dist/` folder and are
served by a local route: the service runs without internet, so no CDN.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint as FlaskBlueprint
from flask import Flask, send_from_directory

from service.api import Api

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
    """Serve /openapi.json, /docs and the Swagger UI files; return the Api that `create_app` fills with blueprints."""
    for key, value in OPENAPI_CONFIG.items():
        app.config.setdefault(key, value)
    api = Api(app)
    app.register_blueprint(docs_assets_blueprint())
    app.extensions["api"] = api
    return api
