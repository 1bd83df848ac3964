"""The shared stores over a folder of objects and SQLite: one host writes, another reads; nothing half-made shows."""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile

import numpy as np
import pytest

from tests.training.test_store import save
from training.data.shared_store import SharedDatasetStore
from training.errors import ModelNotFoundError, StoreConflictError, StoreUnavailable
from training.objectstore import FolderObjects, S3Objects
from training.registry import VersionRegistry
from training.settings import Settings
from training.shared_features import SharedFeatureCache
from training.shared_store import MARKER, SharedModelStore


@pytest.fixture
def shared(tmp_path):
    """Make stores of one shared object folder and database, each with its own local folder (a host)."""
    objects = FolderObjects(tmp_path / "objects")
    registry = VersionRegistry(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")

    def host(name: str, **kwargs) -> SharedModelStore:
        return SharedModelStore(tmp_path / name / "models", objects, registry, **kwargs)

    yield host
    registry.close()


class FailingObjects(FolderObjects):
    """Objects whose puts fail once `fail_after` of them went through (a store going away mid-upload)."""

    def __init__(self, root, fail_after: int) -> None:
        super().__init__(root)
        self.puts, self.fail_after = 0, fail_after

    def put_file(self, key, path):
        self.puts += 1
        if self.puts > self.fail_after:
            raise StoreUnavailable(f"object store {self.url} is unreachable (could not write {key}): test")
        super().put_file(key, path)


def test_a_version_saved_on_one_host_is_served_on_another(shared):
    worker, api = shared("worker"), shared("api")
    assert save(worker, 0.8) == (1, True)
    assert save(worker, 0.7) == (2, False)
    assert api.names() == ["cats"] and api.versions("cats") == [1, 2]
    assert api.published_version("cats") == 1 and api.resolve_version("cats") == 1
    assert api.metadata("cats", 2)["metrics"] == {"accuracy": 0.7} and api.labels("cats", 1) == ["a", "b"]
    kind, path = api.model_path("cats", 1)  # downloaded into the api host's content-addressed cache
    assert kind == "head" and path.read_bytes() == b"weights" and api.cache_root in path.parents
    assert api.identity("cats", 1) == worker.identity("cats", 1) != api.identity("cats", 2)
    api.publish("cats", 2)
    assert worker.published_version("cats") == 2
    with pytest.raises(StoreConflictError):
        worker.delete_version("cats", 2)
    worker.delete_version("cats", 1)
    assert api.versions("cats") == [2]
    with pytest.raises(ModelNotFoundError):
        api.resolve_version("cats", 1)
    assert save(worker, 0.9) == (3, True)  # numbers are never given twice


def test_a_failed_upload_leaves_no_version_and_its_number_is_not_reused(shared, tmp_path):
    store = shared("worker")
    store.objects = FailingObjects(tmp_path / "objects", fail_after=1)  # head.keras goes, labels.json fails
    with pytest.raises(StoreUnavailable, match="unreachable"):
        save(store)
    assert store.versions("cats") == [] and store.names() == []
    assert store.objects.list("models/") == []  # what was written is removed again
    store.objects = FolderObjects(tmp_path / "objects")
    assert save(store) == (2, True)


def test_a_version_without_its_marker_is_invisible_and_swept(shared, tmp_path):
    store = shared("worker")
    version = store.registry.reserve("cats", "job-1")  # a worker that died after uploading a file, before the marker
    store.objects.put_bytes(f"models/cats/{version}/head.keras", b"half")
    assert store.versions("cats") == [] and store.version_of_job("cats", "job-1") is None
    with pytest.raises(ModelNotFoundError):
        store.resolve_version("cats", version)
    assert store.sweep(older_than_seconds=3600) == []  # still young: it may be uploading
    assert len(store.sweep(older_than_seconds=0)) == 1
    assert store.objects.list("models/") == []


def test_a_marker_that_disagrees_with_the_database_is_refused(shared):
    worker, api = shared("worker"), shared("api")
    save(worker)
    worker.objects.put_bytes("models/cats/1/" + MARKER, json.dumps({"files": {}}).encode())
    with pytest.raises(ModelNotFoundError, match="does not match"):
        api.model_path("cats", 1)


def test_the_local_cache_is_bounded(shared):
    worker = shared("worker")
    for byte in b"xyz":  # content-addressed: three different versions (the same files would share one copy)
        worker.save_version("big", lambda folder, b=byte: (folder / "head.keras").write_bytes(bytes([b]) * 4000), {},
                            ["a"])
    api = shared("api", cache_bytes=9000)  # room for two versions
    one, two = api.model_path("big", 1)[1].parent, api.model_path("big", 2)[1].parent
    os.utime(one, (0, 0))
    os.utime(two, (100, 100))  # both last used long ago, version 1 first
    api.model_path("big", 3)
    assert sorted(p.name for p in api.cache_root.iterdir()) == sorted([two.name, api.identity("big", 3)[1]])
    api.model_path("big", 1)  # back from the store; version 2, now the least recently used, goes
    assert {p.name for p in api.cache_root.iterdir()} == {one.name, api.identity("big", 3)[1]}


def test_s3_unreachable_is_store_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    objects = S3Objects("bucket", "prefix", timeout_s=1)
    with pytest.raises(StoreUnavailable, match=r"s3://bucket/prefix is unreachable \(could not read a/b\)"):
        objects.get_bytes("a/b")


def test_s3_objects_against_an_s3_server(monkeypatch, tmp_path):
    from moto.server import ThreadedMotoServer

    from tests.live import free_port
    from training.objectstore import create_bucket

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        settings = Settings(store_url="s3://made-here/run", store_timeout_s=2)
        assert create_bucket(settings) is True and create_bucket(settings) is False
        objects = S3Objects.from_url("s3://made-here/run", timeout_s=2)
        objects.put_bytes("a/one", b"1")
        (tmp_path / "two").write_bytes(b"2" * 100)
        objects.put_file("a/b/two", tmp_path / "two")
        assert objects.list("a/") == ["a/b/two", "a/one"] and objects.list("b/") == []
        assert objects.get_bytes("a/one") == b"1" and objects.get_bytes("a/missing") is None
        assert objects.get_file("a/b/two", tmp_path / "copy") and (tmp_path / "copy").read_bytes() == b"2" * 100
        assert not objects.get_file("a/missing", tmp_path / "none") and not (tmp_path / "none").exists()
        with pytest.raises(StoreUnavailable, match="refused to read x: NoSuchBucket"):
            S3Objects("no-such-bucket", timeout_s=2).get_bytes("x")
        assert objects.delete_prefix("a/") == 2 and objects.list("") == []
    finally:
        server.stop()


def test_store_url_is_checked():
    assert Settings(store_url="s3://bucket/some/prefix").shared
    with pytest.raises(ValueError, match=r"STORE_URL must be unset or s3://bucket\[/prefix\], received: 'bucket'"):
        Settings(store_url="bucket")


def test_an_archive_uploaded_on_one_host_is_ingested_and_trained_on_others(tmp_path, small_digits_dir):
    objects = FolderObjects(tmp_path / "objects")
    api, ingest, trainer = (SharedDatasetStore(tmp_path / host / "datasets", objects) for host in ("api", "in", "tr"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(small_digits_dir.rglob("*.png")):
            archive.write(path, path.relative_to(small_digits_dir).as_posix())
    record = api.add_archive(io.BytesIO(buffer.getvalue()), 2**30, "digits.zip")
    assert record["status"] == "queued" and not record["existing"]
    assert not (tmp_path / "api" / "datasets" / record["id"]).exists()  # the web host keeps no copy
    assert ingest.ingest(record["id"])["status"] == "ready"
    assert api.get(record["id"])["status"] == "ready" and [r["id"] for r in api.list()] == [record["id"]]
    dataset = trainer.dataset(record["id"])
    assert len(dataset.items) == 36 and all(item.path.is_file() for item in dataset.items)
    assert api.add_archive(io.BytesIO(buffer.getvalue()), 2**30, "again.zip")["existing"]
    api.delete(record["id"])
    assert api.list() == [] and objects.list("datasets/") == []


def test_features_computed_on_one_host_are_read_on_another(tmp_path):
    objects = FolderObjects(tmp_path / "objects")
    one = SharedFeatureCache(tmp_path / "one", "bb", 4, objects)
    other = SharedFeatureCache(tmp_path / "other", "bb", 4, objects)
    one.add(["a", "b"], np.ones((2, 4), np.float32))
    one.add(["c"], np.zeros((1, 4), np.float32))
    found = other.lookup(["a", "z"])
    assert list(found) == ["a"] and found["a"].tolist() == [1, 1, 1, 1]
    assert len(list(other.root.glob("*.npy"))) == 1  # the shard of "c" was not downloaded
    assert other.lookup(["c"])["c"].tolist() == [0, 0, 0, 0]


def test_an_export_built_on_a_worker_host_is_streamed_by_an_api_host(shared, tmp_path, monkeypatch):
    import training.export
    from training.errors import WeightsError
    from training.shared_exports import SharedExportStore

    worker_models, api_models = shared("worker"), shared("api")
    save(worker_models)
    worker = SharedExportStore(tmp_path / "worker" / "exports", worker_models, worker_models.objects)
    api = SharedExportStore(tmp_path / "api" / "exports", api_models, api_models.objects)

    def fake_export(settings, name, version, fmt, out):
        if fmt == "tflite":
            raise WeightsError("the backbone weights are missing")
        out.mkdir()
        (out / "model.onnx").write_bytes(b"onnx" * 100)

    monkeypatch.setattr(training.export, "export_version", fake_export)
    assert api.state("cats", 1, "onnx")["status"] == "missing"
    api.request("cats", 1, "onnx")
    built = worker.build(Settings(), "cats", 1, "onnx")
    assert api.state("cats", 1, "onnx") == {"status": "ready", "error": None}
    copy = api.archive("cats", 1, "onnx")
    assert copy.read_bytes() == built.read_bytes() and tmp_path / "api" in copy.parents
    with pytest.raises(WeightsError):
        worker.build(Settings(), "cats", 1, "tflite")
    assert api.state("cats", 1, "tflite") == {"status": "failed", "error": "the backbone weights are missing"}
    api.request("cats", 1, "tflite")  # asked again: the failure is cleared everywhere
    assert api.state("cats", 1, "tflite")["status"] == "queued"
    api.discard("cats", 1)
    assert api.objects.list("exports/") == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_saves_get_distinct_numbers_and_one_published(backend, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.live import postgres_schema

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_schema("registry")) if backend == "postgresql" else \
            f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        objects = FolderObjects(tmp_path / "objects")
        registries = [VersionRegistry(url) for _ in range(4)]  # four processes' worth of engines
        for registry in registries:
            stack.callback(registry.close)

        def save_on(index: int) -> tuple[int, bool]:
            store = SharedModelStore(tmp_path / f"host{index % 4}", objects, registries[index % 4])
            return store.save_version("race", lambda folder, i=index: (folder / "head.keras").write_bytes(bytes([i])),
                                      {"metrics": {"accuracy": 0.5}}, ["a"], "auto")

        with ThreadPoolExecutor(8) as pool:
            saved = list(pool.map(save_on, range(8)))
        assert sorted(version for version, _ in saved) == list(range(1, 9))
        store = SharedModelStore(tmp_path / "reader", objects, registries[0])
        assert store.versions("race") == list(range(1, 9)) and store.published_version("race") is not None
