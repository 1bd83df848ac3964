"""Structured logs: JSON lines, one per request, each with a request id.

The request id is taken from a well-formed `X-Request-ID` header (so a proxy's id
follows the request) or made up, and is sent back in the answer's `X-Request-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, request

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

access_logger = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message and the `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the `service` loggers to stderr as JSON lines (once per process)."""
    logger = logging.getLogger("service")
    if any(getattr(handler, "json_lines", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.json_lines = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # One line per event, not a second one from the root logger.


def start_request() -> None:
    """Note the start time and the request id."""
    g.started = time.perf_counter()
    sent = request.headers.get("X-Request-ID", "")
    g.request_id = sent if REQUEST_ID.match(sent) else uuid.uuid4().hex


def log_request(response: Response) -> Response:
    """Log one JSON line for the finished request and return its id to the client."""
    duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    request_id = g.get("request_id", "-")
    response.headers["X-Request-ID"] = request_id
    access_logger.info("request", extra={
        "method": request.method, "path": request.path, "status": response.status_code,
        "duration_ms": round(duration_ms, 2), "request_id": request_id,
        "endpoint": request.url_rule.rule if request.url_rule else None,
    })
    return response


def init_app(app: Flask) -> None:
    """Log every request as a JSON line (register before any hook that may answer early)."""
    configure_logging()
    app.before_request(start_request)
    app.after_request(log_request)
