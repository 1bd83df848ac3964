"""Malformed, oversized and unauthorised requests, in-process; then the whole corpus through a real gunicorn.

The gunicorn pass is the "process stays healthy" check: two workers, every corpus case
sent over real sockets (chunked bodies included), each accepted archive followed over HTTP
until its ingest worker ended it, and afterwards /healthz answers, a normal prediction works,
the worker processes are the same ones as before (none crashed or was replaced), and nothing
was written outside the data folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import partial
from pathlib import Path

import pytest

from tests.hardening import corpus
from tests.hardening.conftest import ingest_worker, make_sentinel, service_env, victim_digest
from tests.hardening.send import send_http, send_wsgi, wait_until_up
from tests.hardening.test_hostile_archives import ingested, left_behind, stored_problems
from tests.live import GUNICORN, ROOT, child_pids, free_port, stop

HOST = "127.0.0.1"


@pytest.mark.parametrize("case", corpus.request_cases(), ids=lambda case: case.name)
def test_request_in_process(app, tally, case):
    status, body = send_wsgi(app, case.request)
    problems = corpus.check_answer(case, status, body)
    tally.add("requests/http", problems, case.id)
    assert not problems, problems


@pytest.fixture
def gunicorn(tmp_path, trained_models):
    """gunicorn with two workers over a sentinel folder, on a free loopback port, and an ingest worker."""
    sentinel = make_sentinel(tmp_path / "sentinel", trained_models)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
           **service_env(sentinel.settings), "HOST": HOST, "PORT": str(port), "WEB_CONCURRENCY": "2",
           "THREADS": "4", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        with ingest_worker(sentinel.settings, tmp_path / "ingest.log"):
            wait_until_up(HOST, port, process)
            yield port, process, sentinel, log_path
    finally:
        stop(process)


def rss_mb(pids: set[int]) -> dict[str, float]:
    """Resident memory of each process, in MB (from /proc)."""
    sizes = {}
    for pid in sorted(pids):
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
        sizes[str(pid)] = round(int(line.split()[1]) / 1024, 1)
    return sizes


def predict_once(port: int) -> None:
    body, content_type = corpus.multipart([("image", "ok.png", corpus.encode(corpus.noise(32, 40), "PNG"))])
    status, answer = send_http(HOST, port, corpus.Request("POST", corpus.PREDICT, body, content_type))
    assert status == 200, answer
    assert json.loads(answer)["model"] == corpus.MODEL


def test_whole_corpus_through_gunicorn(gunicorn, tally):
    port, process, sentinel, log_path = gunicorn
    for _ in range(4):  # both workers load the model before their process ids are taken
        predict_once(port)
    before_workers = child_pids(process.pid)
    assert len(before_workers) == 2, before_workers
    rss_before = rss_mb(before_workers)
    before, digest = sentinel.snapshot(), victim_digest()

    unexpected = []
    send = partial(send_http, HOST, port)
    for case in corpus.all_cases():
        try:
            status, body = send(case.request)
        except OSError as exc:
            problems = [f"no answer: {exc!r}"]
        else:
            problems, record = ingested(send, case, status, body) if case.category == "archives" else \
                (corpus.check_answer(case, status, body), None)
            problems += stored_problems(sentinel.data_dir / "datasets", record)
        tally.add(f"{case.category}/gunicorn", problems, case.id)
        unexpected += [f"{case.id}: {problem}" for problem in problems]

    status, body = send_http(HOST, port, corpus.Request("GET", "/healthz", key=None))
    assert status == 200 and json.loads(body) == {"status": "ok"}
    for _ in range(4):
        predict_once(port)
    assert process.poll() is None
    assert child_pids(process.pid) == before_workers, "a worker crashed or was replaced"
    tally.extra["gunicorn_worker_rss_mb"] = {"before": sorted(rss_before.values()),
                                              "after": sorted(rss_mb(before_workers).values())}
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log[-3000:]
    assert not left_behind(sentinel, before, digest)
    assert not unexpected, unexpected
