"""One error hierarchy for the HTTP layer, mapped to JSON in one place.

Every error answer is `{"error": {"code": "...", "message": "..."}}` with the right
status. Library errors (`TrainingError`) carry their own status; anything
unexpected is logged and answered as a 500 without internals.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from training.errors import TrainingError

logger = logging.getLogger("service.errors")

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "too_many_requests",
         500: "internal_error", 503: "unavailable", 507: "insufficient_storage"}


class ServiceError(Exception):
    """An error answered to the client with `status` and a message meant for it."""

    def __init__(self, message: str, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status
        self.code = code or CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        self.headers = headers or {}


class Overloaded(ServiceError):
    """The prediction queue is full: come back shortly."""

    def __init__(self, message: str = "prediction queue is full, retry shortly", retry_after: int = 1) -> None:
        super().__init__(message, 503, "overloaded", {"Retry-After": str(retry_after)})


class PredictTimeout(ServiceError):
    """A prediction waited longer than PREDICT_TIMEOUT_S for its forward pass."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, 503, "timeout", {"Retry-After": str(retry_after)})


class Unavailable(ServiceError):
    """A part of the runtime cannot answer now (a stopped batching thread, a hung forward pass)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, 503, "unavailable", {"Retry-After": str(retry_after)})


def limit_body(megabytes: int, setting: str) -> None:
    """Give this request's body its own size limit (a 413 past it names `setting`)."""
    request.max_content_length = megabytes * 2**20
    g.body_limit_setting = setting


def error_body(code: str, message: str) -> dict:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}


LOCATIONS = {"json", "query", "form", "files", "headers", "cookies", "view_args", "path"}


def readable(messages, path: tuple[str, ...] = ()) -> str:
    """Flatten marshmallow/webargs error messages into one line: `field.sub: reason; ...`."""
    if isinstance(messages, dict):
        # webargs nests by location ("query", "json") and marshmallow puts whole-object errors
        # under "_schema": the field path says enough without them.
        return "; ".join(readable(value, path if key == "_schema" or not path and key in LOCATIONS
                                  else (*path, str(key)))
                         for key, value in messages.items())
    if isinstance(messages, list) and any(isinstance(item, (dict, list)) for item in messages):
        return "; ".join(readable(item, path) for item in messages)
    text = " ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
    return f"{'.'.join(path)}: {text}" if path else text


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer."""
    response = jsonify(error_body(code, message))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _http_message(exc: HTTPException) -> str:
    """A short message for a werkzeug HTTP error, naming the limit or the path."""
    data = getattr(exc, "data", None) or {}
    if data.get("messages"):  # webargs validation errors
        return readable(data["messages"])
    if isinstance(exc, RequestEntityTooLarge):
        limit = request.max_content_length
        size = f"{limit / 2**20:g} MiB ({g.get('body_limit_setting', 'MAX_UPLOAD_MB')})" if limit else "the limit"
        parts = f", with at most {current_app.config['MAX_FORM_PARTS']} form parts" \
            if request.mimetype == "multipart/form-data" else ""
        return f"request too large: the body may be at most {size}{parts}"
    if exc.code == 404:
        return f"not found: {request.path}"
    if exc.code == 405:
        return f"method {request.method} is not allowed on {request.path}"
    return exc.description or HTTPStatus(exc.code).phrase


def _http_error(exc: HTTPException) -> Response:
    # webargs answers unparseable input with 422 in some paths; the API's bad-input status is 400.
    status = 400 if exc.code == 422 else exc.code
    headers = {key: value for key, value in exc.get_headers() if key.lower() == "allow"}
    return error_response(status, CODES.get(status, "error"), _http_message(exc), headers)


def handle_error(exc: Exception) -> Response:
    """Answer any error as `{"error": {"code", "message"}}` with the right status."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, TrainingError):
        return error_response(exc.status, CODES.get(exc.status, "error"), exc.message)
    if isinstance(exc, HTTPException) and exc.code is not None:
        return _http_error(exc)
    request_id = g.get("request_id", "-")
    logger.error("unexpected error in %s %s (request %s)", request.method, request.path, request_id, exc_info=exc)
    return error_response(500, "internal_error", f"internal error; quote request id {request_id} when reporting it")


def init_app(app: Flask) -> None:
    """Route every exception raised while handling a request to `handle_error`."""
    app.register_error_handler(Exception, handle_error)
