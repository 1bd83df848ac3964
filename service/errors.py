"""Errors answered over HTTP, mapped to JSON in one place.

Every error answer is `{"error": {"code": "...", "message": "..."}}` with the right status.
Library errors (`TrainingError`) say what went wrong; `STATUSES` says how each kind is answered.
Anything unexpected (a bare ValueError from a bug included) is logged and answered as a 500
without internals.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from training.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
    PredictTimeout,
    StoreFullError,
    StoreUnavailable,
    TrainingError,
    Unavailable,
    UnsupportedImageError,
    WeightsError,
)

logger = logging.getLogger("service.errors")

# How long a client is told to wait before retrying when the broker (the job and ingest queues) is down.
BROKER_RETRY_AFTER_S = 30

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "too_many_requests",
         500: "internal_error", 503: "unavailable", 507: "insufficient_storage"}

# Library error class -> (status, code). An error is answered by the first of its classes (its MRO,
# most specific first) found here: UnsupportedImageError is a 415 although it is an InvalidInput (400).
STATUSES: dict[type[TrainingError], tuple[int, str]] = {
    UnsupportedImageError: (415, "unsupported_media_type"),
    InvalidInput: (400, "bad_request"),
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    StoreFullError: (507, "insufficient_storage"),
    WeightsError: (503, "unavailable"),
    Overloaded: (503, "overloaded"),
    PredictTimeout: (503, "timeout"),
    StoreUnavailable: (503, "store_unavailable"),
    Unavailable: (503, "unavailable"),
    # Any other message meant for the user (e.g. job params that are not JSON-able) is about its input.
    TrainingError: (400, "bad_request"),
}


def http_status(exc: TrainingError) -> tuple[int, str]:
    """The status and code a library error is answered with."""
    return next(STATUSES[klass] for klass in type(exc).__mro__ if klass in STATUSES)


def http_headers(exc: TrainingError) -> dict[str, str]:
    """Headers a library error is answered with: Retry-After for what may work again soon."""
    retry_after = getattr(exc, "retry_after", None)
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


class ServiceError(Exception):
    """An error about the HTTP request itself, answered with `status` and a message meant for the client.

    Only for what the library cannot know: content types, request encodings, per-request limits,
    keys, and answers that need their own headers (Location, WWW-Authenticate). Everything about
    the data itself is a library error, answered through `STATUSES`.
    """

    def __init__(self, message: str, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status
        self.code = code or CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        self.headers = headers or {}


def broker_unavailable(exc: Exception, what: str, queue: str, then: str, url: str) -> ServiceError:
    """A 503 for work recorded as queued whose message could not be sent: the broker is down or unreachable.

    `then` says what happens next and how to retry safely; the answer points at the record (`url`).
    """
    logger.error("could not send %s to the %s queue: %s", what, queue, exc)
    return ServiceError(f"{what} is recorded as queued but the {queue} queue (broker) is unavailable: "
                        f"{type(exc).__name__}: {exc}. {then}", 503, "unavailable",
                        {"Retry-After": str(BROKER_RETRY_AFTER_S), "Location": url})


def limit_body(megabytes: int, setting: str) -> None:
    """Give this request's body its own size limit (a 413 past it names `setting`)."""
    request.max_content_length = megabytes * 2**20
    g.body_limit_setting = setting


# The standard protocols' routes (Open Inference Protocol, TensorFlow Serving REST) answer errors as their
# clients read them: `{"error": "message"}`, with the same statuses as v1.
# Their URLs, for the requests that match no route (a version that is not a number, say).
FLAT_ERROR_BLUEPRINTS = {"inference_v2", "tfserving"}
FLAT_ERROR_PATHS = re.compile(r"/v2(/.*)?|/v1/models/[^/]+(/versions/[^/]+)?(:predict|:classify|/metadata)")


def flat_errors() -> bool:
    """Whether this request is answered in the standard protocols' error shape."""
    return request.blueprint in FLAT_ERROR_BLUEPRINTS or FLAT_ERROR_PATHS.fullmatch(request.path) is not None


def error_body(code: str, message: str) -> dict:
    """The JSON body of every error answer: v1's `{"error": {"code", "message"}}`, or the protocols' own."""
    if flat_errors():
        return {"error": message}
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
        return error_response(*http_status(exc), exc.message, http_headers(exc))
    if isinstance(exc, HTTPException) and exc.code is not None:
        return _http_error(exc)
    request_id = g.get("request_id", "-")
    logger.error("unexpected error in %s %s (request %s)", request.method, request.path, request_id, exc_info=exc)
    return error_response(500, "internal_error", f"internal error; quote request id {request_id} when reporting it")


def init_app(app: Flask) -> None:
    """Route every exception raised while handling a request to `handle_error`."""
    app.register_error_handler(Exception, handle_error)
