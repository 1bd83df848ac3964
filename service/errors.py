"""One error hierarchy for the HTTP layer, mapped to JSON in one place.

Every error answer is `{"error": {"code": "...", "message": "..."}}` with the right
status. Library errors (`TrainingError`) carry their own status; anything
unexpected is logged and answered as a 500 without internals.
"""

from __future__ import annotations

from http import HTTPStatus

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "too_many_requests",
         500: "internal_error", 503: "unavailable"}


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


class NotReady(ServiceError):
    """A dependency (store, backbone) is not ready."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, "not_ready", {"Retry-After": "5"})


def error_body(code: str, message: str) -> dict:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}
