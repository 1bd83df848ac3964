"""The export store: one archive per version and format, made once, visible whole or not at all, failures kept.

The conversion itself (`training.export`) is replaced here by a stand-in that writes a small folder:
tests/export checks the real exports in their own runtimes.
"""

from __future__ import annotations

import tarfile
import threading
import time

import pytest

import training.export
import training.exports as exports_module
from training.errors import InvalidInput, ModelNotFoundError, WeightsError
from training.exports import ExportStore, archive_name, check_format
from training.store import ModelStore


@pytest.fixture
def store(settings) -> ExportStore:
    """An export store over a model store holding one version (`parts` v1; its files do not matter here)."""
    models = ModelStore(settings.model_dir)
    models.save_version("parts", lambda folder: (folder / "model.keras").write_bytes(b"weights"),
                        {"classes": ["a", "b"]}, ["a", "b"])
    return ExportStore.from_settings(settings)


@pytest.fixture
def calls(monkeypatch) -> list:
    """Replace the conversion with one that writes `model.onnx` and `labels.txt`; record each call."""
    made = []

    def fake_export(settings, name, version, fmt, out):
        made.append((name, version, fmt))
        out.mkdir()
        (out / "model.onnx").write_bytes(b"onnx" * 100)
        (out / "labels.txt").write_text("a\nb\n")

    monkeypatch.setattr(training.export, "export_version", fake_export)
    return made


def test_a_build_makes_one_archive_and_later_builds_reuse_it(store, settings, calls):
    assert store.state("parts", 1, "onnx")["status"] == "missing"
    archive = store.build(settings, "parts", 1, "onnx")
    assert store.build(settings, "parts", 1, "onnx") == archive and len(calls) == 1
    assert store.state("parts", 1, "onnx") == {"status": "ready", "error": None}
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["labels.txt", "model.onnx"]
    assert [p.name for p in archive.parent.iterdir() if p.name.startswith(".")] == []  # no leftovers
    assert archive_name("parts", 1, "onnx") == "parts-v1-onnx.tar.gz"


def test_a_request_is_queued_until_it_is_stale(store, monkeypatch):
    store.request("parts", 1, "tflite")
    assert store.state("parts", 1, "tflite")["status"] == "queued"
    later = time.time() + exports_module.RESEND_AFTER_S + 1
    monkeypatch.setattr(exports_module.time, "time", lambda: later)
    assert store.state("parts", 1, "tflite")["status"] == "missing"  # the message was lost: the API sends it again


def test_a_build_in_progress_is_running_and_a_second_build_waits_for_it(store, settings, monkeypatch):
    started, release, made = threading.Event(), threading.Event(), []

    def slow_export(settings, name, version, fmt, out):
        made.append(fmt)
        started.set()
        release.wait(10)
        out.mkdir()
        (out / "model.keras").write_bytes(b"k")

    monkeypatch.setattr(training.export, "export_version", slow_export)
    results = []
    builds = [threading.Thread(target=lambda: results.append(store.build(settings, "parts", 1, "keras")))
              for _ in range(2)]
    builds[0].start()
    try:
        assert started.wait(10)
        builds[1].start()  # another worker got the same message
        assert store.state("parts", 1, "keras")["status"] == "running"  # the probe does not stop either build
        assert store.archive("parts", 1, "keras") is None  # nothing half-made is visible
    finally:
        release.set()
        for build in builds:
            build.join(10)
    assert store.state("parts", 1, "keras")["status"] == "ready"
    assert made == ["keras"] and len(results) == 2 and results[0] == results[1]  # made once, both return it


def test_a_failure_is_kept_with_its_reason_and_retried_later(store, settings, monkeypatch):
    def failing_export(settings, name, version, fmt, out):
        out.mkdir()
        (out / "half.onnx").write_bytes(b"x")
        raise WeightsError("the backbone weights are missing")

    monkeypatch.setattr(training.export, "export_version", failing_export)
    store.request("parts", 1, "onnx")
    with pytest.raises(WeightsError):
        store.build(settings, "parts", 1, "onnx")
    assert store.state("parts", 1, "onnx") == {"status": "failed", "error": "the backbone weights are missing"}
    assert store.archive("parts", 1, "onnx") is None
    assert sorted(p.name for p in (settings.data_dir / "exports" / "parts" / "1").iterdir()) == [
        "onnx.error", "onnx.lock"]  # no partial archive, no build folder
    later = time.time() + exports_module.RETRY_AFTER_FAILURE_S + 1
    monkeypatch.setattr(exports_module.time, "time", lambda: later)
    assert store.state("parts", 1, "onnx")["status"] == "missing"


def test_unknown_versions_and_formats_are_refused(store):
    with pytest.raises(ModelNotFoundError):
        store.state("parts", 2, "onnx")
    with pytest.raises(ModelNotFoundError):
        store.state("other", 1, "onnx")
    with pytest.raises(InvalidInput, match="received: 'pb'"):
        check_format("pb")


def test_discard_removes_a_versions_exports(store, settings, calls):
    store.build(settings, "parts", 1, "onnx")
    store.discard("parts", 1)
    assert not (settings.data_dir / "exports" / "parts" / "1").exists()
