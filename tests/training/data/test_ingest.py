"""Ingest after unpacking (`training.data.ingest`): the class layout, every file checked, duplicates and
conflicts dropped, the rules a training run needs, the report and the content id.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
import zipfile

import pytest

from tests.training.data.helpers import (
    LIMITS,
    images,
    jpeg,
    png,
    write_tar,
    write_tree,
    write_zip,
)
from training.data.dataset import IngestLimits, Skipped
from training.data.ingest import ingest, scan_directory
from training.errors import DatasetError


def test_good_zip(rng, tmp_path):
    files = images(rng, {"cats": 5, "dogs": 6})
    files["cats/2020/jan/deep.png"] = png(rng)  # deeper folders belong to their class
    work = tmp_path / "work"
    dataset = ingest(write_zip(tmp_path / "data.zip", files), work)

    assert dataset.classes == ["cats", "dogs"]
    assert dataset.counts() == {"cats": 6, "dogs": 6}
    assert dataset.skipped == [] and dataset.duplicates == [] and dataset.conflicts == []
    assert not dataset.has_split()
    assert all(item.split is None for item in dataset.items)
    for item in dataset.items:
        assert item.path.is_absolute() and item.path.is_file()
        assert item.path.is_relative_to(work.resolve())
    assert [(i.label, i.path) for i in dataset.items] == sorted((i.label, i.path) for i in dataset.items)
    deep = next(i for i in dataset.items if i.path.name == "deep.png")
    assert deep.label == "cats"


def test_good_directory_scanned_in_place(rng, tmp_path):
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 5, "dogs": 5}))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}
    dataset = ingest(root)
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    assert before == after
    assert dataset.root == root.resolve()
    assert dataset.counts() == {"cats": 5, "dogs": 5}
    assert all(item.path.parent.parent == root.resolve() for item in dataset.items)


def test_single_top_folder_descended(rng, tmp_path):
    files = images(rng, {"cats": 5, "dogs": 5}, prefix="export/dataset/")
    files["export/README.md"] = b"# my photos\n"
    dataset = ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work")
    assert dataset.classes == ["cats", "dogs"]
    assert dataset.skipped == [Skipped("export/README.md", "not in a class folder")]


def test_train_val_split(rng, tmp_path):
    files = {**images(rng, {"cats": 4, "dogs": 4}, prefix="train/"), **images(rng, {"cats": 2, "dogs": 1}, "val/")}
    files["train/loose.png"] = png(rng)
    files["test/cats/00.png"] = png(rng)
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=IngestLimits(min_images_per_class=5))

    assert dataset.has_split()
    assert dataset.counts() == {"cats": 6, "dogs": 5}  # train + val count toward the minimum
    splits = sorted((i.label, i.split) for i in dataset.items)
    assert splits.count(("cats", "val")) == 2 and splits.count(("dogs", "train")) == 4
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert reasons == {"train/loose.png": "not in a class folder", "test/cats/00.png": "outside train/ and val/"}


def test_validation_folder_name_and_union_of_classes(rng, tmp_path):
    files = {**images(rng, {"cats": 3, "dogs": 3}, prefix="train/"), **images(rng, {"cats": 1}, "validation/")}
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=LIMITS)
    assert dataset.classes == ["cats", "dogs"]
    assert [i.split for i in dataset.items if i.label == "cats"].count("val") == 1
    assert any("no images in val/ for 'dogs'" in w for w in dataset.warnings)


def test_split_class_without_train_images_is_rejected(rng, tmp_path):
    files = {**images(rng, {"cats": 3, "dogs": 3}, prefix="train/"), **images(rng, {"birds": 3}, "val/")}
    with pytest.raises(DatasetError, match="no images in train/ for 'birds'"):
        ingest(write_tree(tmp_path / "ds", files), limits=LIMITS)


def test_unicode_and_spaces_in_class_names(rng, tmp_path):
    decomposed = unicodedata.normalize("NFD", "café")  # as macOS writes it
    files = images(rng, {"chats noirs": 2, "猫": 2, decomposed: 2})
    dataset = ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work", LIMITS)
    assert dataset.classes == sorted(["chats noirs", "猫", "café"])
    assert dataset.counts()["café"] == 2


def test_directory_symlinks_not_followed(rng, tmp_path):
    outside = write_tree(tmp_path / "outside", images(rng, {"secret": 3}))
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 2, "dogs": 2}))
    (root / "cats" / "linked").symlink_to(outside / "secret")
    (root / "dogs" / "one.png").symlink_to(outside / "secret" / "00.png")
    dataset = ingest(root, limits=LIMITS)
    assert set(dataset.skipped) == {Skipped("cats/linked", "symlink"), Skipped("dogs/one.png", "symlink")}
    assert dataset.counts() == {"cats": 2, "dogs": 2}


def test_nested_archive_skipped(rng, tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("a.png", png(rng))
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/more.zip": inner.getvalue(),
             "dogs/sneaky.png": inner.getvalue(), "dogs/photos.tar.gz": b"whatever"}
    dataset = ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work", LIMITS)
    assert {s.path: s.reason for s in dataset.skipped} == dict.fromkeys(
        ["cats/more.zip", "dogs/sneaky.png", "dogs/photos.tar.gz"], "nested archive (not supported)")


def test_non_image_files_skipped_with_reasons(rng, tmp_path):
    cut = jpeg(rng, 30)
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/notes.txt": b"just text", "dogs/empty.png": b"",
             "dogs/cut.jpg": cut[: len(cut) * 2 // 3], "cats/huge.png": png(rng, size=64),
             "dogs/big.bmp": bytes(2**20 + 9000)}
    limits = IngestLimits(min_images_per_class=2, max_image_pixels=1000)
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=limits)
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert reasons["cats/notes.txt"].startswith("not an image in an allowed format")
    assert reasons["dogs/cut.jpg"].startswith("cannot decode image")
    assert reasons["dogs/empty.png"] == "empty file"
    assert "over the limit of 1000 pixels" in reasons["cats/huge.png"]
    assert reasons["dogs/big.bmp"].startswith("file too large for an image")
    assert dataset.counts() == {"cats": 2, "dogs": 2}


def test_exact_duplicate_within_label(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    files["cats/zz/copy.png"] = files["cats/00.png"]
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=LIMITS)
    assert dataset.duplicates == [{"path": "cats/zz/copy.png", "duplicate_of": "cats/00.png"}]
    assert Skipped("cats/zz/copy.png", "duplicate of cats/00.png") in dataset.skipped
    assert dataset.counts() == {"cats": 3, "dogs": 3}
    assert [i.path.name for i in dataset.items if i.label == "cats"] == ["00.png", "01.png", "02.png"]


def test_duplicate_across_train_and_val_keeps_train_copy(rng, tmp_path):
    files = {**images(rng, {"cats": 3, "dogs": 3}, prefix="train/"), **images(rng, {"cats": 1}, "val/")}
    files["val/cats/aaa.png"] = files["train/cats/02.png"]  # sorts first by name, still the val copy goes
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=LIMITS)
    assert dataset.duplicates == [{"path": "val/cats/aaa.png", "duplicate_of": "train/cats/02.png"}]
    kept = [i for i in dataset.items if i.path.name == "02.png" and i.label == "cats"]
    assert [i.split for i in kept] == ["train"]


def test_same_image_under_two_labels_is_a_conflict(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    files["dogs/looks_like_a_cat.png"] = files["cats/01.png"]
    dataset = ingest(write_tree(tmp_path / "ds", files), limits=LIMITS)
    assert len(dataset.conflicts) == 1
    conflict = dataset.conflicts[0]
    assert conflict["paths"] == ["cats/01.png", "dogs/looks_like_a_cat.png"]
    assert conflict["labels"] == ["cats", "dogs"] and len(conflict["sha256"]) == 64
    assert dataset.counts() == {"cats": 2, "dogs": 3}  # every copy dropped
    assert {s.path for s in dataset.skipped} == {"cats/01.png", "dogs/looks_like_a_cat.png"}


def test_one_class_rejected(rng, tmp_path):
    with pytest.raises(DatasetError, match=r"at least 2 classes.*'cats' \(5 images\)"):
        ingest(write_zip(tmp_path / "one.zip", images(rng, {"cats": 5})), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_no_class_folders_rejected(rng, tmp_path):
    root = write_tree(tmp_path / "ds", {"a.png": png(rng), "b.png": png(rng)})
    with pytest.raises(DatasetError, match="no class folders.*not in a class folder"):
        ingest(root)


def test_empty_class_folder_counts_as_a_class(rng, tmp_path):
    files = {**images(rng, {"cats": 5, "dogs": 5}), "birds/": b""}
    with pytest.raises(DatasetError, match="class 'birds' has 0 images; each class needs at least 5"):
        ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work")


def test_classes_under_minimum_are_all_named(rng, tmp_path):
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 3, "dogs": 5, "fish": 4}))
    (root / "birds").mkdir()
    with pytest.raises(DatasetError) as caught:
        ingest(root)
    assert caught.value.message == "class 'birds' has 0 images, 'cats' has 3, 'fish' has 4; each class needs at least 5"


def test_skipped_files_hinted_when_a_class_falls_short(rng, tmp_path):
    files = {**images(rng, {"cats": 5}), **{f"dogs/{n}.heic": b"ftypheic" + bytes(20) for n in range(5)}}
    with pytest.raises(DatasetError, match="5 files were skipped, most often: not an image"):
        ingest(write_tree(tmp_path / "ds", files))


def test_imbalance_warning_names_classes(rng, tmp_path):
    dataset = ingest(write_tree(tmp_path / "ds", images(rng, {"cats": 13, "dogs": 4})), limits=LIMITS)
    assert any("imbalanced" in w and "'cats' has 13" in w and "'dogs' has 4" in w for w in dataset.warnings)


def test_report_shape_is_json_serialisable(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    files["cats/copy.png"] = files["cats/00.png"]
    files["dogs/notes.txt"] = b"text"
    report = ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work", LIMITS).report()
    assert set(report) == {"id", "classes", "images", "skipped", "duplicates", "conflicts", "warnings"}
    assert report["classes"] == {"cats": 3, "dogs": 3} and report["images"] == 6
    assert report["duplicates"] == [{"path": "cats/copy.png", "duplicate_of": "cats/00.png"}]
    assert {"path": "dogs/notes.txt", "reason": report["skipped"][-1]["reason"]} in report["skipped"]
    assert json.loads(json.dumps(report)) == report


def test_id_stable_across_zip_and_directory(rng, tmp_path):
    files = images(rng, {"cats": 5, "dogs": 5})
    from_dir = ingest(write_tree(tmp_path / "ds", files))
    from_zip = ingest(write_zip(tmp_path / "ds.zip", {f"ds/{k}": v for k, v in files.items()}), tmp_path / "w")
    from_tar = ingest(write_tar(tmp_path / "ds.tgz", files), tmp_path / "w2")
    assert from_dir.id == from_zip.id == from_tar.id
    assert len(from_dir.id) == 16 and int(from_dir.id, 16) >= 0
    files["dogs/extra.png"] = png(rng)
    assert ingest(write_tree(tmp_path / "ds2", files)).id != from_dir.id


def test_scan_directory_accepts_prior_skips(rng, tmp_path):
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 2, "dogs": 2}))
    dataset = scan_directory(root, LIMITS, [Skipped("zz/link", "symlink")])
    assert dataset.skipped == [Skipped("zz/link", "symlink")]
    assert os.path.commonpath([str(i.path) for i in dataset.items]) == str(root.resolve())
