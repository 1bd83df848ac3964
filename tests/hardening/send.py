"""Deliver a corpus request: to the Flask app in-process (WSGI), or over a socket to a real server.

Both send the bytes as they are. A chunked request has no Content-Length: in-process the
WSGI environ says so the way gunicorn does (`wsgi.input_terminated`), over a socket it goes
with `Transfer-Encoding: chunked`.
"""

from __future__ import annotations

import http.client
import io
import json
import time
from collections.abc import Callable

from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.hardening.corpus import Request

CHUNK = 64 * 1024


def headers(request: Request) -> dict[str, str]:
    found = {"Content-Type": request.content_type} if request.content_type else {}
    found.update(request.headers)
    if request.key:
        found["Authorization"] = f"Bearer {request.key}"
    return found


def send_wsgi(app, request: Request) -> tuple[int, bytes]:
    """Run the request through the app in-process; return (status, body)."""
    path, _, query = request.path.partition("?")
    builder = EnvironBuilder(path=path, query_string=query, method=request.method, headers=headers(request),
                             data=request.body if request.method != "GET" else None,
                             content_type=request.content_type)
    environ = builder.get_environ()
    if not request.content_type:
        environ.pop("CONTENT_TYPE", None)
    if request.chunked:
        environ.pop("CONTENT_LENGTH", None)
        environ.update({"wsgi.input": io.BytesIO(request.body), "wsgi.input_terminated": True})
    app_iter, status, _ = run_wsgi_app(app, environ, buffered=True)
    try:
        return int(status.split()[0]), b"".join(app_iter)
    finally:
        if hasattr(app_iter, "close"):
            app_iter.close()


def send_http(host: str, port: int, request: Request, timeout: float = 60) -> tuple[int, bytes]:
    """Send the request over a new connection; return (status, body).

    A server may answer (413) and close before it has read a large body; the answer is
    then read from the socket even though sending the rest failed.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = headers(request)
        if request.chunked:
            body = (request.body[i:i + CHUNK] for i in range(0, len(request.body), CHUNK))
            sent["Transfer-Encoding"] = "chunked"
        else:
            body = request.body if request.method != "GET" else None
        try:
            conn.request(request.method, request.path, body=body, headers=sent, encode_chunked=request.chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the answer, if any, is already on its way
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_up(host: str, port: int, process, deadline_s: float = 90) -> None:
    """Wait for /healthz to answer 200, failing early if the server process exits."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status, _ = send_http(host, port, Request("GET", "/healthz", key=None), timeout=5)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not come up (exit code {process.poll()})")
        time.sleep(0.2)


def follow_dataset(send: Callable[[Request], tuple[int, bytes]], record: dict, timeout_s: float = 60) -> dict:
    """GET an uploaded dataset's URL through `send` until the ingest worker ended it (ready or failed)."""
    deadline = time.monotonic() + timeout_s
    while record.get("status") in ("queued", "ingesting"):
        if time.monotonic() > deadline:
            raise AssertionError(f"dataset {record['id']} still {record['status']} after {timeout_s:.0f} s: "
                                 "is the ingest worker running?")
        time.sleep(0.05)
        status, body = send(Request("GET", record["url"]))
        if status != 200:
            raise AssertionError(f"GET {record['url']} answered {status}: {body[:300]!r}")
        record = json.loads(body)
    return record
