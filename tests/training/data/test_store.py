"""The dataset store: uploads kept by content and queued, one ingest however often it is asked for, the manifest,
failures that say why, crashes left behind and picked up again, atomic writes, id checks.

Every image and archive is generated here (Pillow, numpy, zipfile, tarfile).
"""

from __future__ import annotations

import fcntl
import io
import json
import re
import tarfile
import threading
import zipfile

import pytest

from tests.training.data.helpers import png
from training.data import store as store_module
from training.data.dataset import IngestLimits
from training.data.ingest import ingest
from training.data.store import (
    ARCHIVE,
    INGESTED,
    LOCK,
    RECORD,
    DatasetNotFoundError,
    DatasetStore,
    display_name,
)
from training.errors import ArchiveError, DatasetError, NotFound

MAX_BYTES = 64 * 2**20


@pytest.fixture
def store(tmp_path) -> DatasetStore:
    return DatasetStore(tmp_path / "datasets", IngestLimits())


def zip_bytes(rng, counts: dict[str, int], prefix: str = "") -> bytes:
    """A zip of `<prefix><label>/<n>.png` for each label and count."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for label, count in counts.items():
            for n in range(count):
                zf.writestr(f"{prefix}{label}/{n:02d}.png", png(rng))
    return buffer.getvalue()


def add(store: DatasetStore, data: bytes, max_bytes: int = MAX_BYTES, filename: str | None = "photos.zip") -> dict:
    return store.add_archive(io.BytesIO(data), max_bytes, filename)


def leftovers(store: DatasetStore) -> list[str]:
    """Everything in the store root, hidden names included."""
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


def files_of(store: DatasetStore, dataset_id: str) -> list[str]:
    """What a dataset's folder holds at its top."""
    return sorted(p.name for p in (store.root / dataset_id).iterdir())


@pytest.fixture
def unpacks(monkeypatch) -> list:
    """Count the store's calls to ingest (each unpacks and decodes the whole archive)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return ingest(*args, **kwargs)

    monkeypatch.setattr(store_module, "ingest", counting)
    return calls


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding an image fail the test: what must not decode may not even try."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image")

    monkeypatch.setattr("training.data.ingest.decode_image", refuse)


# --- upload -------------------------------------------------------------------------------------------------------


def test_upload_stores_the_archive_queued_without_decoding_anything(store, rng, no_decoding, unpacks):
    data = zip_bytes(rng, {"cat": 6, "dog": 5})
    record = add(store, data)

    assert record["status"] == "queued" and record["error"] is None and record["existing"] is False
    assert record["id"] == record["sha256"][:16] and len(record["sha256"]) == 64
    assert record["size"] == len(data) and record["filename"] == "photos.zip" and record["created"]
    assert "classes" not in record  # no report before the ingest
    assert (store.root / record["id"] / ARCHIVE).read_bytes() == data
    assert files_of(store, record["id"]) == [ARCHIVE, RECORD]
    assert leftovers(store) == [record["id"]]
    assert unpacks == []
    assert store.get(record["id"]) == {k: v for k, v in record.items() if k != "existing"}


def test_ingest_writes_the_report_and_the_manifest(store, rng):
    record = add(store, zip_bytes(rng, {"good": 7, "scratched": 5}, prefix="photos/"))
    ready = store.ingest(record["id"])

    assert ready["status"] == "ready" and ready["error"] is None and ready["attempts"] == 1
    assert ready["classes"] == {"good": 7, "scratched": 5} and ready["images"] == 12
    assert ready["skipped"] == [] and ready["duplicates"] == [] and ready["warnings"]
    assert ready["sha256"] == record["sha256"] and ready["created"] == record["created"]
    assert ready["started"] <= ready["finished"]
    assert store.get(record["id"]) == ready
    assert files_of(store, record["id"]) == [LOCK, ARCHIVE, INGESTED, RECORD]
    manifest = json.loads((store.root / record["id"] / INGESTED / "manifest.json").read_text())
    assert len(manifest["items"]) == 12 and set(manifest["items"][0]) == {"path", "label", "split", "sha256", "size"}


def test_training_reads_the_manifest_without_decoding_again(store, rng, monkeypatch):
    record = add(store, zip_bytes(rng, {"good": 7, "scratched": 5}))
    store.ingest(record["id"])
    with monkeypatch.context() as patch:
        patch.setattr("training.data.ingest.decode_image", lambda *a, **k: pytest.fail("decoded again"))
        dataset = store.dataset(record["id"])

    again = ingest(dataset.root, limits=IngestLimits())  # the unpacked folder, checked from scratch for the test
    assert dataset == again and dataset.id == store.get(record["id"])["content_id"]
    assert dataset.root == (store.root / record["id"] / INGESTED / "data").resolve()


def test_tar_gz_upload(store, rng):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for label in ("a", "b"):
            for n in range(5):
                data = png(rng)
                info = tarfile.TarInfo(f"{label}/{n}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    record = add(store, buffer.getvalue(), filename="set.tar.gz")
    assert store.ingest(record["id"])["classes"] == {"a": 5, "b": 5}


def test_same_bytes_twice_is_the_same_dataset_ingested_once(store, rng, unpacks):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    first = add(store, data)
    store.ingest(first["id"])
    second = add(store, data)

    assert second["id"] == first["id"] and second["existing"] is True
    assert second["status"] == "ready" and second["created"] == first["created"]
    assert store.ingest(first["id"]) == store.get(first["id"])  # a redelivered message: nothing done again
    assert len(unpacks) == 1
    assert leftovers(store) == [first["id"]]


def test_different_content_gets_a_different_id(store, rng):
    first = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    second = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    assert first["id"] != second["id"] and second["existing"] is False
    assert leftovers(store) == sorted([first["id"], second["id"]])


@pytest.mark.parametrize("data", [b"not an archive at all", b""], ids=["not-archive", "empty"])
def test_what_is_not_an_archive_is_refused_at_upload_and_leaves_nothing(store, data):
    with pytest.raises(ArchiveError, match="'photos.zip' does not start like one"):
        add(store, data)
    assert leftovers(store) == []


def test_upload_over_max_bytes_raises_and_leaves_nothing(store, rng):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    with pytest.raises(ArchiveError, match=r"upload is larger than .* MB"):
        add(store, data, max_bytes=len(data) - 1)
    assert leftovers(store) == []


def test_upload_limit_names_megabytes(store):
    with pytest.raises(ArchiveError, match="upload is larger than 1 MB"):
        add(store, b"x" * (2**20 + 1), max_bytes=2**20)
    assert leftovers(store) == []


def test_upload_of_exactly_max_bytes_is_accepted(store, rng):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    assert add(store, data, max_bytes=len(data))["size"] == len(data)


def test_disk_error_while_storing_an_upload_cleans_up(store, rng, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    assert leftovers(store) == []


def test_concurrent_uploads_of_the_same_bytes_yield_one_dataset(store, rng, monkeypatch):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    # Both uploads must pass the "already there?" check before either renames, to exercise the rename race.
    barrier = threading.Barrier(2, timeout=10)
    check = store_module.archive_kind

    def check_together(*args, **kwargs):
        barrier.wait()
        return check(*args, **kwargs)

    monkeypatch.setattr(store_module, "archive_kind", check_together)
    results: list[dict] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            results.append(add(store, data))
        except BaseException as exc:  # reported below, since a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len({r["id"] for r in results}) == 1 and len(results) == 2
    assert sorted(r["existing"] for r in results) == [False, True]
    assert leftovers(store) == [results[0]["id"]]


# --- ingest: once, failures, crashes ------------------------------------------------------------------------------


def test_concurrent_ingests_of_one_dataset_unpack_it_once(store, rng, monkeypatch):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_ingest(*args, **kwargs):
        calls.append(args)
        started.set()
        release.wait(10)  # the second caller arrives while the first is still at it
        return ingest(*args, **kwargs)

    monkeypatch.setattr(store_module, "ingest", slow_ingest)
    results: list[dict] = []
    first = threading.Thread(target=lambda: results.append(store.ingest(record["id"])))
    first.start()
    assert started.wait(10)
    assert store.get(record["id"])["status"] == "ingesting"
    second = threading.Thread(target=lambda: results.append(store.ingest(record["id"])))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first, not unpacking a second time
    release.set()
    first.join(30)
    second.join(30)

    assert len(calls) == 1
    assert [r["status"] for r in results] == ["ready", "ready"] and results[0] == results[1]


@pytest.mark.parametrize(("counts", "message"), [
    ({"only": 6}, "a dataset needs at least 2 classes with images, one folder per class; found 'only' (6 images)"),
    ({"a": 5, "b": 2}, "class 'b' has 2 images; each class needs at least 5"),
])
def test_a_dataset_that_cannot_be_trained_on_fails_with_the_rule(store, rng, counts, message):
    record = add(store, zip_bytes(rng, counts))
    failed = store.ingest(record["id"])

    assert failed["status"] == "failed" and failed["error"] == message and "classes" not in failed
    assert files_of(store, record["id"]) == [LOCK, RECORD]  # the bytes will never make a dataset: not kept
    with pytest.raises(DatasetError, match=re.escape(f"dataset {record['id']} cannot be trained on: {message}")):
        store.trainable(record["id"])
    with pytest.raises(DatasetError, match="cannot be trained on"):
        store.dataset(record["id"])
    assert store.ingest(record["id"]) == failed  # final: asking again changes nothing


def test_a_corrupt_archive_passes_the_upload_check_and_fails_its_ingest(store, rng):
    data = zip_bytes(rng, {"a": 5, "b": 5})[:3000]  # starts like a zip, cut short
    record = add(store, data, filename="../../holiday.zip")
    failed = store.ingest(record["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("not a valid .zip/.tar.gz archive: 'holiday.zip' is truncated or corrupt")
    assert leftovers(store) == [record["id"]] and INGESTED not in files_of(store, record["id"])


def test_a_full_disk_fails_the_ingest_keeps_the_archive_and_an_upload_of_it_retries(store, rng, monkeypatch):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    record = add(store, data)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_manifest", disk_full)
        failed = store.ingest(record["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"disk full: could not unpack dataset {record['id']}")
    assert files_of(store, record["id"]) == [LOCK, ARCHIVE, RECORD]  # no staging folder, the archive kept

    again = add(store, data)
    assert again["existing"] is True and again["status"] == "queued" and again["error"] is None
    assert store.ingest(record["id"])["status"] == "ready"


def test_an_unexpected_crash_is_recorded_not_raised(store, rng, monkeypatch):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    monkeypatch.setattr(store_module, "ingest", lambda *a, **k: 1 / 0)
    failed = store.ingest(record["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "internal error while ingesting: ZeroDivisionError: division by zero"
    assert ARCHIVE in files_of(store, record["id"])  # not the bytes' fault: uploading them again retries


def test_an_ingest_whose_process_died_is_requeued_and_redone(store, rng):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    folder = store.root / record["id"]
    # As a process SIGKILLed mid-ingest leaves it: the record says ingesting, a half staging folder, no lock held.
    store._write(folder, {**record, "status": "ingesting"})
    (folder / ".staging-dead" / "data" / "a").mkdir(parents=True)
    with open(folder / LOCK, "a+") as held:  # while a live process holds the lock, it is not abandoned
        fcntl.flock(held, fcntl.LOCK_EX)
        assert store.requeue_abandoned() == []
    assert store.get(record["id"])["status"] == "ingesting"

    assert store.requeue_abandoned() == [record["id"]]
    assert store.get(record["id"])["status"] == "queued" and [r["id"] for r in store.queued()] == [record["id"]]
    ready = store.ingest(record["id"])
    assert ready["status"] == "ready" and ".staging-dead" not in files_of(store, record["id"])


def test_an_ingest_whose_process_keeps_dying_fails_instead_of_running_forever(store, rng, unpacks):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    record = add(store, data)
    # The third process that started it died too (out of memory, say): the message would come back forever.
    store._write(store.root / record["id"], {**record, "status": "ingesting", "attempts": 3})
    failed = store.ingest(record["id"])
    assert failed["status"] == "failed" and "started 3 times and its process died each time" in failed["error"]
    assert unpacks == [] and ARCHIVE in files_of(store, record["id"])

    again = add(store, data)  # not the bytes' fault: uploading them again tries afresh
    assert again["status"] == "queued" and again["attempts"] == 0
    assert store.ingest(record["id"])["attempts"] == 1


def test_a_crash_between_the_rename_and_the_record_is_finished_without_unpacking(store, rng, unpacks):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    finish = store._finish
    crashed = []

    def crash(folder, record):
        crashed.append(record)
        raise SystemExit("killed")  # what a SIGKILL leaves: ingested/ renamed into place, the record not written

    store._finish = crash
    with pytest.raises(SystemExit):
        store.ingest(record["id"])
    store._finish = finish
    assert store.get(record["id"])["status"] == "ingesting" and len(unpacks) == 1

    assert store.ingest(record["id"])["status"] == "ready"
    assert len(unpacks) == 1


def test_queued_lists_waiting_datasets_oldest_first(store, rng):
    first = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    second = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    ready = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    store.ingest(ready["id"])
    assert [r["id"] for r in store.queued()] == [first["id"], second["id"]]


def test_a_dataset_stored_before_ingest_workers_is_ingested_once_more(store, rng):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    record = add(store, data)
    folder = store.root / record["id"]
    # The layout of earlier versions: the archive, report.json and the unpacked data/ folder.
    (folder / RECORD).unlink()
    (folder / "data" / "a").mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"id": record["id"], "sha256": record["sha256"],
                                                    "size": record["size"], "created": record["created"],
                                                    "classes": {"a": 5, "b": 5}}))
    legacy = store.get(record["id"])
    assert legacy["status"] == "queued" and legacy["sha256"] == record["sha256"]
    assert [r["id"] for r in store.queued()] == [record["id"]]

    assert store.ingest(record["id"])["classes"] == {"a": 5, "b": 5}
    assert files_of(store, record["id"]) == [LOCK, ARCHIVE, INGESTED, RECORD]


# --- reading and ids ----------------------------------------------------------------------------------------------


def test_a_dataset_not_ingested_yet_cannot_be_read_for_training(store, rng):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    assert store.trainable(record["id"])["status"] == "queued"
    with pytest.raises(DatasetError, match="not ingested yet"):
        store.dataset(record["id"])


@pytest.mark.parametrize("bad", ["../x", "ABCDEF0123456789", "abc", "0123456789abcdef0", "../../../etc/pas",
                                 "0123456789abcdef\n", "", None])
def test_crafted_ids_are_refused(store, bad):
    for call in (store.get, store.ingest, store.dataset, store.trainable, store.delete):
        with pytest.raises(ValueError, match="dataset_id"):
            call(bad)


def test_unknown_id_is_not_found(store):
    for call in (store.get, store.ingest, store.dataset, store.delete):
        with pytest.raises(DatasetNotFoundError) as info:
            call("0123456789abcdef")
        assert isinstance(info.value, NotFound)  # a 404: tests/service/test_errors.py


def test_get_list_delete(store, rng):
    assert store.list() == []
    first = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    second = add(store, zip_bytes(rng, {"x": 5, "y": 5, "z": 5}))
    assert [r["id"] for r in store.list()] == [second["id"], first["id"]]
    assert store.ingest(first["id"])["classes"] == {"a": 5, "b": 5}
    store.delete(first["id"])
    assert [r["id"] for r in store.list()] == [second["id"]]
    assert leftovers(store) == [second["id"]]
    with pytest.raises(DatasetNotFoundError):
        store.get(first["id"])


def test_list_ignores_hidden_and_foreign_entries(store, rng):
    record = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    (store.root / ".staging-leftover").mkdir()
    (store.root / "notes.txt").write_text("hello")
    assert [r["id"] for r in store.list()] == [record["id"]]


def test_from_settings_uses_datasets_dir_and_the_ingest_limits(settings):
    store = DatasetStore.from_settings(settings)
    assert store.root == settings.datasets_dir and store.limits == IngestLimits.from_settings(settings)


@pytest.mark.parametrize(("given", "safe"), [
    ("photos.zip", "photos.zip"), ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\set.zip", "C__Users_me_set.zip"),
    ("données 1.tar.gz", "données 1.tar.gz"), ("a/b/<x>.zip", "_x_.zip"), (None, "archive"), ("", "archive"),
    ("..", "archive"), ("/", "archive"),
])
def test_upload_names_are_made_safe(given, safe):
    assert display_name(given) == safe
