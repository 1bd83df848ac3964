"""Tests for the dataset store: content addressing, atomic writes, cleanup on failure, id checks.

Every image and archive is generated here (Pillow, numpy, zipfile).
"""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.datasets import DatasetNotFoundError, DatasetStore
from training.errors import ArchiveError, DatasetError, NotFound
from training.ingest import IngestLimits, ingest

LIMITS = IngestLimits()
MAX_BYTES = 64 * 2**20


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture
def store(tmp_path) -> DatasetStore:
    return DatasetStore(tmp_path / "datasets")


def png(rng, size: int = 16) -> bytes:
    """A small PNG of random noise, so every image differs."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_bytes(rng, counts: dict[str, int], prefix: str = "") -> bytes:
    """A zip of `<prefix><label>/<n>.png` for each label and count."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for label, count in counts.items():
            for n in range(count):
                zf.writestr(f"{prefix}{label}/{n:02d}.png", png(rng))
    return buffer.getvalue()


def add(store: DatasetStore, data: bytes, max_bytes: int = MAX_BYTES) -> dict:
    return store.add_archive(io.BytesIO(data), LIMITS, max_bytes)


def leftovers(store: DatasetStore) -> list[str]:
    """Everything in the store root, hidden names included."""
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


@pytest.fixture
def count_ingest(monkeypatch):
    """Count the calls the store makes to ingest (that is, unpacks)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return ingest(*args, **kwargs)

    monkeypatch.setattr(datasets, "ingest", counting)
    return calls


def test_upload_reports_classes_counts_and_layout(store, rng):
    data = zip_bytes(rng, {"cat": 6, "dog": 5})
    record = add(store, data)
    assert record["classes"] == {"cat": 6, "dog": 5}
    assert record["images"] == 11
    assert record["existing"] is False
    assert record["size"] == len(data)
    assert record["id"] == record["sha256"][:16] and len(record["sha256"]) == 64
    folder = store.root / record["id"]
    assert (folder / "archive").read_bytes() == data
    assert (folder / "data").is_dir()
    assert leftovers(store) == [record["id"]]
    stored = store.get(record["id"])
    assert "existing" not in stored
    assert stored == {k: v for k, v in record.items() if k != "existing"}


def test_tar_gz_upload(store, rng):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for label in ("a", "b"):
            for n in range(5):
                data = png(rng)
                info = tarfile.TarInfo(f"{label}/{n}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert add(store, buffer.getvalue())["classes"] == {"a": 5, "b": 5}


def test_same_bytes_twice_is_the_same_dataset_unpacked_once(store, rng, count_ingest):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    first = add(store, data)
    second = add(store, data)
    assert second["id"] == first["id"]
    assert second["existing"] is True
    assert second["created"] == first["created"]
    assert len(count_ingest) == 1
    assert leftovers(store) == [first["id"]]


def test_different_content_gets_a_different_id(store, rng):
    first = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    second = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    assert first["id"] != second["id"]
    assert second["existing"] is False
    assert leftovers(store) == sorted([first["id"], second["id"]])


@pytest.mark.parametrize("data", [b"not an archive at all", b"PK\x03\x04" + b"\x00" * 200],
                         ids=["not-archive", "corrupt-zip"])
def test_bad_archive_raises_and_leaves_nothing(store, data):
    with pytest.raises(ArchiveError):
        add(store, data)
    assert leftovers(store) == []


def test_one_class_raises_dataset_error_and_leaves_nothing(store, rng):
    with pytest.raises(DatasetError, match="at least 2 classes"):
        add(store, zip_bytes(rng, {"only": 6}))
    assert leftovers(store) == []


def test_too_few_images_raises_dataset_error_and_leaves_nothing(store, rng):
    with pytest.raises(DatasetError, match="'b' has 2 images"):
        add(store, zip_bytes(rng, {"a": 5, "b": 2}))
    assert leftovers(store) == []


def test_upload_over_max_bytes_raises_and_leaves_nothing(store, rng, count_ingest):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    with pytest.raises(ArchiveError, match=r"upload is larger than .* MB"):
        add(store, data, max_bytes=len(data) - 1)
    assert leftovers(store) == []
    assert count_ingest == []


def test_upload_limit_names_megabytes(store):
    with pytest.raises(ArchiveError, match="upload is larger than 1 MB"):
        add(store, b"x" * (2**20 + 1), max_bytes=2**20)
    assert leftovers(store) == []


def test_upload_of_exactly_max_bytes_is_accepted(store, rng):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    assert add(store, data, max_bytes=len(data))["size"] == len(data)


def test_disk_error_while_writing_cleans_up(store, rng, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    assert leftovers(store) == []


@pytest.mark.parametrize("bad", ["../x", "ABCDEF0123456789", "abc", "0123456789abcdef0", "../../../etc/pas",
                                 "0123456789abcdef\n", "", None])
def test_crafted_ids_are_refused(store, bad):
    for call in (store.get, store.path, store.delete):
        with pytest.raises(ValueError, match="dataset_id"):
            call(bad)


def test_unknown_id_is_not_found(store):
    for call in (store.get, store.path, store.delete):
        with pytest.raises(DatasetNotFoundError) as info:
            call("0123456789abcdef")
        assert isinstance(info.value, NotFound)  # a 404: tests/service/test_errors.py


def test_get_path_list_delete(store, rng):
    assert store.list() == []
    first = add(store, zip_bytes(rng, {"a": 5, "b": 5}))
    second = add(store, zip_bytes(rng, {"x": 5, "y": 5, "z": 5}))
    assert [r["id"] for r in store.list()] == [second["id"], first["id"]]
    assert store.get(first["id"])["classes"] == {"a": 5, "b": 5}
    assert store.path(second["id"]) == store.root / second["id"] / "data"
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


def test_concurrent_uploads_of_the_same_bytes_yield_one_dataset(store, rng, monkeypatch):
    data = zip_bytes(rng, {"a": 5, "b": 5})
    # Both uploads must pass the "already there?" check before either renames, to exercise the rename race.
    barrier = threading.Barrier(2, timeout=10)

    def ingest_together(*args, **kwargs):
        barrier.wait()
        return ingest(*args, **kwargs)

    monkeypatch.setattr(datasets, "ingest", ingest_together)
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


def test_unpacked_path_is_ready_for_training(store, rng):
    record = add(store, zip_bytes(rng, {"good": 7, "scratched": 5}, prefix="photos/"))
    again = ingest(store.path(record["id"]), limits=LIMITS)
    assert again.counts() == record["classes"] == {"good": 7, "scratched": 5}
    assert again.id == record["content_id"]


def test_from_settings_uses_datasets_dir(settings):
    assert DatasetStore.from_settings(settings).root == settings.datasets_dir


@pytest.mark.parametrize(("given", "safe"), [
    ("photos.zip", "photos.zip"), ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\set.zip", "C__Users_me_set.zip"),
    ("données 1.tar.gz", "données 1.tar.gz"), ("a/b/<x>.zip", "_x_.zip"), (None, "archive"), ("", "archive"),
    ("..", "archive"), ("/", "archive"),
])
def test_upload_names_are_made_safe(given, safe):
    assert datasets.display_name(given) == safe


def test_errors_name_the_uploaded_file_and_it_is_stored_as_archive(store, rng):
    with pytest.raises(ArchiveError, match="'notes.zip' does not start like one"):
        store.add_archive(io.BytesIO(b"these are notes"), LIMITS, MAX_BYTES, "../notes.zip")
    assert leftovers(store) == []
    record = store.add_archive(io.BytesIO(zip_bytes(rng, {"a": 5, "b": 5})), LIMITS, MAX_BYTES, "set.zip")
    assert sorted(p.name for p in (store.root / record["id"]).iterdir()) == ["archive", "data", "report.json"]
