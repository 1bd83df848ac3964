"""The dataset types (`training.data.dataset`): helpers, the limits and their one source of defaults, the manifest."""

from __future__ import annotations

import json

import pytest

from tests.training.data.helpers import LIMITS, images, write_zip
from training.data.dataset import Dataset, IngestLimits, Item, read_manifest, write_manifest
from training.data.ingest import ingest
from training.errors import DatasetError
from training.images import DEFAULT_MAX_PIXELS
from training.settings import Settings


def test_dataset_helpers(tmp_path):
    item = Item(tmp_path / "a.png", "cats", "0" * 64, "train")
    dataset = Dataset(tmp_path, ["cats", "dogs"], [item])
    assert dataset.counts() == {"cats": 1, "dogs": 0}
    assert dataset.has_split()
    assert dataset.report()["skipped"] == []


def test_limits_from_settings():
    settings = Settings(max_archive_entries=7, max_archive_mb=3, max_compression_ratio=50, max_image_pixels=1000,
                        min_images_per_class=2)
    assert IngestLimits.from_settings(settings) == IngestLimits(7, 3 * 2**20, 50, 1000, 2)


def test_limit_defaults_have_one_source_the_settings():
    defaults = Settings()
    assert IngestLimits() == IngestLimits.from_settings(defaults)
    assert DEFAULT_MAX_PIXELS == defaults.max_image_pixels == IngestLimits().max_image_pixels


def test_manifest_gives_back_the_dataset_ingest_returned(rng, tmp_path):
    files = {**images(rng, {"cats": 3, "dogs": 3}, prefix="train/"), **images(rng, {"cats": 1}, prefix="val/")}
    files["train/cats/copy.png"] = files["train/cats/00.png"]
    files["train/dogs/notes.txt"] = b"text"
    files["train/dogs/looks_like_a_cat.png"] = files["val/cats/00.png"]
    work = tmp_path / "work"
    ingested = ingest(write_zip(tmp_path / "data.zip", files), work, LIMITS)
    write_manifest(ingested, tmp_path / "manifest.json")

    read = read_manifest(tmp_path / "manifest.json", work)

    assert read == ingested  # the same items (paths, labels, splits, hashes, sizes), skips, duplicates, warnings
    assert read.report() == ingested.report() and read.id == ingested.id
    assert all(item.size == item.path.stat().st_size > 0 for item in read.items)
    entries = json.loads((tmp_path / "manifest.json").read_text())["items"]
    assert {"path": "train/cats/00.png", "label": "cats", "split": "train", "sha256": read.items[0].sha256,
            "size": read.items[0].size} in entries  # relative paths: the folder can move with its manifest


def test_a_manifest_of_another_format_is_refused(rng, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99, "items": []}))
    with pytest.raises(DatasetError, match="format 99"):
        read_manifest(tmp_path / "manifest.json", tmp_path)
