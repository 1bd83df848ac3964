"""The reliability report: records written by the runs, printed together, and a failing exit status for bad news."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.reliability import main, record
from tests.live import ROOT

LOAD = {"clients": 32, "duration_s": 120.0, "requests": 9000, "errors": 0, "error_rate": 0.0, "p50_ms": 350.0,
        "p99_ms": 1400.0, "rps": 75.0, "publishes": 80, "publish_errors": 0, "rss_start_mb": 3000.0,
        "rss_end_mb": 3015.0, "rss_peak_mb": 3020.0, "recorded": "2026-11-28T10:00:00+00:00",
        "overload": {"clients": 32, "duration_s": 8.0, "requests": 1900, "ok": 200, "rejected_503": 1700,
                     "other_errors": 0, "p50_503_ms": 100.0, "p99_503_ms": 380.0, "p50_200_ms": 170.0,
                     "p99_200_ms": 500.0, "healthy_after": True}}
FAULTS = {"faults": [{"name": "worker SIGKILLed mid-training", "survived": True, "detail": "re-run once"},
                     {"name": "disk full while saving a version", "survived": True, "detail": "failed cleanly"}]}
BAD_INPUTS = {"tried": 120, "by_category": {"archives": 40, "images": 80}, "unexpected": []}


@pytest.fixture
def records_dir(tmp_path, monkeypatch):
    folder = tmp_path / "records"
    monkeypatch.setenv("RELIABILITY_DIR", str(folder))
    return folder


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_report_prints_every_record_and_passes(records_dir, capsys):
    record("bad_inputs", BAD_INPUTS)
    record("load", LOAD)
    record("faults", FAULTS)

    status, out, err = run_report(capsys, "--require", "bad_inputs,load,faults")

    assert status == 0, err
    assert "bad inputs tried: 120, unexpected answers: 0" in out and "  images: 80" in out
    assert ("load held: 32 clients for 120 s, 9000 requests, 0 errors (rate 0.0000), p50 350 ms, p99 1400 ms, "
            "75.0 req/s [recorded 2026-11-28T10:00:00+00:00]") in out
    assert "published / rolled back 80 times during the load, 0 errors" in out
    assert "memory: 3000 MB after warm-up, 3015 MB at end (+0.5%), peak 3020 MB" in out
    assert ("overload: 32 clients for 8 s past the queue bound, 1900 requests: 200 answered, 1700 got 503 + "
            "Retry-After (p50 100 ms, p99 380 ms), 0 other errors; healthy after") in out
    assert "faults survived: 2 of 2" in out and "ok   worker SIGKILLed mid-training: re-run once" in out
    assert sorted(p.name for p in records_dir.iterdir()) == ["bad_inputs.json", "faults.json", "load.json"]


def test_missing_records_fail_and_say_which(records_dir, capsys):
    status, out, err = run_report(capsys, "--require", "load,faults")
    assert status == 1
    assert out.strip() == f"no records in {records_dir}"
    assert "missing records: load, faults (run their steps first)" in err

    record("load", LOAD)
    status, _, err = run_report(capsys, "--require", "load,faults")
    assert status == 1 and "missing records: faults " in err


@pytest.mark.parametrize(("name", "data", "shown"), [
    ("faults", {"faults": [*FAULTS["faults"], {"name": "Redis restarted", "survived": False,
                                               "detail": "FAILED: jobs stuck"}]},
     "LOST Redis restarted: FAILED: jobs stuck"),
    ("bad_inputs", {**BAD_INPUTS, "unexpected": ["POST /v1/datasets empty zip -> 500"]},
     "UNEXPECTED POST /v1/datasets empty zip -> 500"),
    ("load", {**LOAD, "errors": 3, "error_rate": 0.0003}, "3 errors (rate 0.0003)"),
    ("load", {**LOAD, "overload": {**LOAD["overload"], "other_errors": 2}}, "2 other errors"),
    ("overload", {**LOAD["overload"], "healthy_after": False}, "NOT healthy after"),
])
def test_bad_news_fails_the_report(records_dir, capsys, name, data, shown):
    record(name, data)
    status, out, _ = run_report(capsys)
    assert status == 1 and shown in out


def test_a_newer_record_replaces_the_older_one_and_unknown_records_print_as_json(records_dir, capsys):
    record("load", {**LOAD, "requests": 1})
    record("load", LOAD)
    record("custom", {"b": 2, "a": 1})
    status, out, _ = run_report(capsys, "--dir", str(records_dir))
    assert status == 0
    assert "9000 requests" in out and " 1 requests" not in out
    assert 'custom: {"a": 1, "b": 2}' in out
    assert json.loads((records_dir / "load.json").read_text()) == LOAD
    assert not list(records_dir.glob("*.tmp"))


def test_the_report_command_runs_as_a_module(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "faults.json").write_text(json.dumps(FAULTS))
    result = subprocess.run([sys.executable, "-m", "bench.reliability", "--dir", str(folder), "--require", "faults"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("faults survived: 2 of 2")


def test_a_partial_run_is_named_and_never_stands_in_for_the_whole_one(records_dir, capsys):
    record("bad_inputs-partial", {**BAD_INPUTS, "tried": 7})

    status, out, err = run_report(capsys, "--require", "bad_inputs")

    assert status == 1 and "missing records: bad_inputs" in err
    assert "bad inputs tried: 7, unexpected answers: 0 [record bad_inputs-partial]" in out
