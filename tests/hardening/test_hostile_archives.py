"""Hostile dataset archives: through POST /v1/datasets (in-process) and the ingest worker, and through the library's
ingest.

Each upload is answered at once (202, or 400 for what is not an archive), then ingested by a real
ingest worker process; its dataset must end ready with the expected report, or failed saying why.
It all runs inside a sentinel folder: afterwards only the data folder may have changed, no escape
attempt's file exists anywhere (the sentinel, /, /tmp, /etc), /etc/passwd is as it was, no staging
folder is left behind, and a failed dataset keeps nothing but its record.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from tests.hardening import corpus
from tests.hardening.conftest import Sentinel, limits, victim_digest
from tests.hardening.send import follow_dataset, send_wsgi
from training.data.ingest import ingest
from training.data.store import ARCHIVE, INGESTED, LOCK, RECORD

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


def ingested(send, case: corpus.Case, status: int, body: bytes) -> tuple[list[str], dict | None]:
    """The upload's answer checked, then (when it was accepted) the dataset it ended as: (problems, record)."""
    problems = corpus.check_answer(case, status, body)
    if status != 202 or problems:
        return problems, None
    record = follow_dataset(send, json.loads(body))
    return corpus.check_dataset(case, record), record


def stored_problems(datasets: Path, record: dict | None) -> list[str]:
    """What an upload left in the dataset store that it must not: staging folders, links, a failed one's files."""
    problems = [f"left behind: {path.relative_to(datasets)}" for path in
                [*datasets.glob(".*"), *datasets.glob("*/.staging-*")]]
    if record is not None and record["status"] == "ready":
        unpacked = datasets / record["id"] / INGESTED / "data"
        problems += [f"stored a link: {path}" for path in unpacked.rglob("*") if path.is_symlink()]
    if record is not None and record["status"] == "failed":
        # Nothing unpacked stays, nor the bytes: they can never make a dataset.
        kept = sorted(path.name for path in (datasets / record["id"]).iterdir())
        problems += [] if kept == [LOCK, RECORD] else [f"a failed dataset kept {kept}"]
    return problems


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_archive_over_http(app, sentinel, tally, case):
    before, digest = sentinel.snapshot(), victim_digest()
    status, body = send_wsgi(app, case.request)
    problems, record = ingested(partial(send_wsgi, app), case, status, body)
    problems += left_behind(sentinel, before, digest) + stored_problems(sentinel.data_dir / "datasets", record)
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
    statuses = sorted(dataset["status"] for dataset in listed.get_json()["datasets"])
    assert statuses == sorted(case.expect.dataset for case in CASES if case.expect.status == 202)
    assert ARCHIVE in {path.name for path in (sentinel.data_dir / "datasets").glob(f"*/{ARCHIVE}")}
