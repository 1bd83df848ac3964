"""Hostile dataset archives: through POST /v1/datasets (in-process) and through the library's ingest.

Each upload runs inside a sentinel folder: after it, only the data folder may have changed,
no escape attempt's file exists anywhere (the sentinel, /, /tmp, /etc), /etc/passwd is as it
was and no staging folder is left behind.
"""

from __future__ import annotations

import json

import pytest

from tests.hardening import corpus
from tests.hardening.conftest import Sentinel, limits, victim_digest
from tests.hardening.send import send_wsgi
from training.ingest import ingest

CASES = corpus.archive_cases()


def left_behind(sentinel: Sentinel, before: dict, digest: str) -> list[str]:
    """What an upload changed that it must not have."""
    after = sentinel.snapshot()
    problems = [f"changed outside the data folder: {path}" for path in sorted(set(before) ^ set(after))]
    problems += [f"modified outside the data folder: {path}" for path in sorted(set(before) & set(after))
                 if before[path] != after[path]]
    problems += [f"escaped: {path}" for path in sentinel.escapes()]
    if victim_digest() != digest:
        problems.append(f"{corpus.VICTIM} changed")
    return problems


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_archive_over_http(app, sentinel, tally, case):
    before, digest = sentinel.snapshot(), victim_digest()
    status, body = send_wsgi(app, case.request)
    problems = corpus.check_answer(case, status, body) + left_behind(sentinel, before, digest)
    datasets = sentinel.data_dir / "datasets"
    problems += [f"left behind: {path.name}" for path in datasets.glob(".*")]
    if status == 201:
        stored = datasets / json.loads(body)["id"] / "data"
        problems += [f"stored a link: {path}" for path in stored.rglob("*") if path.is_symlink()]
    tally.add("archives/http", problems, case.id)
    assert not problems, problems


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_archive_through_ingest(tmp_path, tally, case):
    archive = tmp_path / case.name
    archive.write_bytes(case.data)
    work = tmp_path / "unpack" / "here" / "work"  # deep enough that ../../.. still lands inside tmp_path
    work.parent.mkdir(parents=True)
    sentinel = Sentinel(tmp_path, work)
    before, digest = sentinel.snapshot(), victim_digest()
    try:
        report = ingest(archive, work, limits()).report()
    except Exception as exc:  # noqa: BLE001 - any type is an answer to check
        problems = corpus.check_raised(case, exc)
        problems += [f"workdir not emptied: {path}" for path in work.rglob("*")] if work.exists() else []
    else:
        problems = corpus.check_raised(case, None) + corpus.check_report(case, report)
    problems += left_behind(sentinel, before, digest)
    tally.add("archives/library", problems, case.id)
    assert not problems, problems


def test_service_is_healthy_after_the_archives(app, sentinel):
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    listed = client.get(corpus.DATASETS, headers={"Authorization": f"Bearer {corpus.TRAINING_KEY}"})
    assert listed.status_code == 200
    accepted = {case.name for case in CASES if case.expect.status == 201}
    assert len(listed.get_json()["datasets"]) == len(accepted)
