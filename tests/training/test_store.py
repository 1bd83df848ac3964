"""The model store: atomic versions, numbering, publishing, deleting."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from training.errors import ModelNotFoundError, StoreConflictError
from training.store import ModelStore, validate_name


def write_head(folder):
    (folder / "head.keras").write_bytes(b"weights")


def save(store: ModelStore, accuracy: float = 0.9, publish: str = "auto", name: str = "cats") -> tuple[int, bool]:
    return store.save_version(name, write_head, {"metrics": {"accuracy": accuracy}}, ["a", "b"], publish)


def test_versions_are_numbered_and_the_first_is_published(tmp_path):
    store = ModelStore(tmp_path)
    assert save(store, 0.8) == (1, True)
    assert save(store, 0.7) == (2, False)  # worse: kept, not published
    assert save(store, 0.8) == (3, True)   # as good: published
    assert store.versions("cats") == [1, 2, 3]
    assert store.published_version("cats") == 3
    meta = store.metadata("cats", 2)
    assert meta["version"] == 2 and meta["published"] is False
    assert store.labels("cats", 1) == ["a", "b"]
    assert store.model_path("cats", 1) == ("head", tmp_path / "cats" / "1" / "head.keras")


def test_publish_policies(tmp_path):
    store = ModelStore(tmp_path)
    assert save(store, 0.9, publish="never") == (1, False)
    assert store.published_version("cats") is None
    assert save(store, 0.1, publish="always") == (2, True)


def test_publish_and_roll_back(tmp_path):
    store = ModelStore(tmp_path)
    save(store)
    save(store, publish="always")
    store.publish("cats", 1)
    assert store.resolve_version("cats") == 1
    with pytest.raises(ModelNotFoundError):
        store.publish("cats", 7)
    assert store.published_version("cats") == 1


def test_delete_refuses_the_published_version(tmp_path):
    store = ModelStore(tmp_path)
    save(store)
    save(store, 0.1)
    with pytest.raises(StoreConflictError):
        store.delete_version("cats", 1)
    store.delete_version("cats", 2)
    assert store.versions("cats") == [1]
    assert save(store) == (3, True)  # the deleted number is never handed out again


def test_a_failing_writer_leaves_no_version(tmp_path):
    store = ModelStore(tmp_path)

    def broken(folder):
        (folder / "head.keras").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.save_version("cats", broken, {}, ["a"])
    assert store.versions("cats") == []
    assert store.names() == []
    assert [p.name for p in (tmp_path / "cats").iterdir() if p.name != ".lock"] == []


def _crash_mid_write(root):
    def crash(folder):
        (folder / "head.keras").write_bytes(b"half written")
        os._exit(9)  # like SIGKILL: no cleanup runs

    ModelStore(root).save_version("cats", crash, {}, ["a"])


def test_a_crash_mid_write_leaves_no_visible_version(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_crash_mid_write, args=(tmp_path,))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    store = ModelStore(tmp_path)
    assert store.versions("cats") == []
    assert any(p.name.startswith(".staging-") for p in (tmp_path / "cats").iterdir())  # left, but hidden
    with pytest.raises(ModelNotFoundError):
        store.resolve_version("cats")
    assert save(store) == (1, True)
    assert store.sweep(older_than_seconds=3600) == []  # a save may be in progress: too recent to remove
    swept = store.sweep(older_than_seconds=-1)
    assert [p.name[:9] for p in swept] == [".staging-"]
    assert sorted(p.name for p in (tmp_path / "cats").iterdir()) == [".lock", "1", "counter.json", "published.json"]


def test_concurrent_saves_get_distinct_versions(tmp_path):
    store = ModelStore(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: save(store, publish="never")[0], range(16)))
    assert sorted(results) == list(range(1, 17))


def test_deleting_the_newest_version_never_gives_its_number_back(tmp_path):
    store = ModelStore(tmp_path)
    save(store)
    assert save(store, publish="never") == (2, False)
    store.delete_version("cats", 2)
    assert save(store, publish="never") == (3, False)
    store.delete_version("cats", 3)
    assert save(ModelStore(tmp_path), publish="never") == (4, False)  # another store object: the counter is on disk
    store.delete_version("cats", 4)
    assert store.versions("cats") == [1]
    assert save(store, publish="never") == (5, False)


def test_all_versions_deleted_but_the_published_one_numbers_go_on(tmp_path):
    store = ModelStore(tmp_path)
    for _ in range(3):
        save(store, publish="never")
    store.publish("cats", 2)
    store.delete_version("cats", 1)
    store.delete_version("cats", 3)
    assert store.versions("cats") == [2]
    assert save(store, 0.1) == (4, False)


def test_a_store_without_a_counter_goes_on_from_its_folders(tmp_path):
    store = ModelStore(tmp_path)
    for _ in range(3):
        save(store, publish="never")
    (tmp_path / "cats" / "counter.json").unlink()  # as a store written before the counter existed
    assert save(store, publish="never") == (4, False)
    assert (tmp_path / "cats" / "counter.json").read_text(encoding="utf-8").count("4") == 1


def test_a_counter_behind_the_folders_never_hands_out_a_taken_number(tmp_path):
    store = ModelStore(tmp_path)
    for _ in range(2):
        save(store, publish="never")
    (tmp_path / "cats" / "counter.json").write_text('{"last": 1}', encoding="utf-8")  # e.g. restored from a backup
    assert save(store, publish="never") == (3, False)
    (tmp_path / "cats" / "counter.json").write_text("not json", encoding="utf-8")
    assert save(store, publish="never") == (4, False)


def test_a_number_reserved_by_a_crashed_save_is_skipped_not_reused(tmp_path):
    store = ModelStore(tmp_path)
    save(store)
    (tmp_path / "cats" / "counter.json").write_text('{"last": 7}', encoding="utf-8")  # reserved, then the save died
    assert save(store, publish="never") == (8, False)


def _save_many(root, count, results):
    store = ModelStore(root)
    for _ in range(count):
        results.put(save(store, publish="never")[0])


def test_processes_saving_and_deleting_at_once_never_share_or_reuse_a_number(tmp_path):
    store = ModelStore(tmp_path)
    save(store)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_save_many, args=(tmp_path, 5, results)) for _ in range(3)]
    for process in processes:
        process.start()
    handed_out = []
    while len(handed_out) < 15:
        handed_out.append(results.get(timeout=60))
        for version in store.versions("cats")[1:]:  # delete as they come: the numbers still never repeat
            store.delete_version("cats", version)
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert sorted(handed_out) == list(range(2, 17))
    assert save(store, publish="never")[0] == 17


def test_apply_publish_policy_to_an_existing_version(tmp_path):
    store = ModelStore(tmp_path)
    assert save(store, 0.8, publish="never") == (1, False)
    assert store.apply_publish_policy("cats", 1, "never") is False
    assert store.apply_publish_policy("cats", 1, "auto") is True  # nothing was published
    assert save(store, 0.5, publish="never") == (2, False)
    assert store.apply_publish_policy("cats", 2, "auto") is False  # worse than the published one
    assert save(store, 0.8, publish="never") == (3, False)
    assert store.apply_publish_policy("cats", 3, "auto") is True  # as good: published
    assert store.apply_publish_policy("cats", 2, "always") is True
    assert store.published_version("cats") == 2
    assert store.apply_publish_policy("cats", 2, "never") is True  # a published version stays published
    assert store.published_version("cats") == 2
    with pytest.raises(ValueError, match="policy must be one of .* received: 'sometimes'"):
        store.apply_publish_policy("cats", 1, "sometimes")
    with pytest.raises(ModelNotFoundError):
        store.apply_publish_policy("cats", 9, "always")
    with pytest.raises(ModelNotFoundError):
        store.apply_publish_policy("dogs", 1, "always")
    assert not (tmp_path / "dogs").exists()


def test_a_version_is_found_by_the_job_that_made_it(tmp_path):
    store = ModelStore(tmp_path)
    store.save_version("cats", write_head, {"job": "j1", "metrics": {"accuracy": 0.5}}, ["a"])
    store.save_version("cats", write_head, {"job": "j2", "metrics": {"accuracy": 0.5}}, ["a"])
    assert store.version_of_job("cats", "j2") == 2
    assert store.version_of_job("cats", "j3") is None
    assert store.version_of_job("dogs", "j1") is None


def test_missing_models_and_versions(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFoundError):
        store.resolve_version("nope")
    save(store)
    with pytest.raises(ModelNotFoundError):
        store.resolve_version("cats", 5)
    with pytest.raises(ModelNotFoundError):
        store.metadata("cats", 5)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-x", "x" * 65, "naïve", "a b"])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ValueError, match="model name"):
        validate_name(name)


def test_good_model_names():
    for name in ("cats", "Cats-2", "v1.0_model", "9lives"):
        assert validate_name(name) == name
