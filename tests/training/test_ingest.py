"""Tests for safe dataset ingest: archives, layouts, image checks, duplicates, validation.

Every image and archive is generated here (Pillow, zipfile, tarfile); hostile archives
are built by hand the way an attacker would.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.errors import ArchiveError, DatasetError
from training.ingest import Dataset, IngestLimits, Item, Skipped, ingest, scan_directory, unpack_archive
from training.settings import Settings


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def png(rng, size: int = 16) -> bytes:
    """A small PNG of random noise, so every image differs."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(rng, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def images(rng, counts: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    """{"<prefix><label>/<n>.png": bytes} for each label and count."""
    return {f"{prefix}{label}/{n:02d}.png": png(rng) for label, count in counts.items() for n in range(count)}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def tar_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", extra=()) -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            tf.addfile(*tar_file(name, data))
        for info, data in extra:
            tf.addfile(info, data)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def patch_zip_flags(blob: bytes, name: str, set_bits: int = 0, clear_bits: int = 0) -> bytes:
    """Change an entry's general-purpose flags in its local header and central directory record."""
    data = bytearray(blob)
    raw_name = name.encode()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        local = next(i for i in zf.infolist() if i.orig_filename == name).header_offset
    offsets = [local + 6]
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) != -1:
        length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46:start + 46 + length] == raw_name:
            offsets.append(start + 8)
        start += 4
    for offset in offsets:
        flags = struct.unpack_from("<H", data, offset)[0]
        struct.pack_into("<H", data, offset, (flags | set_bits) & ~clear_bits)
    return bytes(data)


LIMITS = IngestLimits(min_images_per_class=2)


# --- good inputs ----------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(("suffix", "mode"), [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_good_tar(rng, tmp_path, suffix, mode):
    files = images(rng, {"cats": 5, "dogs": 5}, prefix="./")  # GNU tar style names
    dataset = ingest(write_tar(tmp_path / f"data{suffix}", files, mode), tmp_path / "work")
    assert dataset.counts() == {"cats": 5, "dogs": 5}
    assert dataset.skipped == []


def test_archive_detected_by_magic_not_suffix(rng, tmp_path):
    files = images(rng, {"cats": 5, "dogs": 5})
    zipped = write_zip(tmp_path / "upload", files)
    tarred = write_tar(tmp_path / "upload.zip", files)  # a tar.gz with a misleading name
    assert ingest(zipped, tmp_path / "w1").counts() == {"cats": 5, "dogs": 5}
    assert ingest(tarred, tmp_path / "w2").counts() == {"cats": 5, "dogs": 5}


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


def test_zip_without_utf8_flag_reads_names_as_utf8(rng, tmp_path):
    files = images(rng, {"éclair": 2, "pâté": 2})
    blob = write_zip(tmp_path / "flagged.zip", files).read_bytes()
    for name in files:
        blob = patch_zip_flags(blob, name, clear_bits=0x800)
    (tmp_path / "data.zip").write_bytes(blob)
    dataset = ingest(tmp_path / "data.zip", tmp_path / "work", LIMITS)
    assert dataset.classes == ["pâté", "éclair"]


def test_hidden_files_and_os_litter_ignored(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    litter = {"__MACOSX/cats/._00.png": b"\x00\x05\x16\x07", ".DS_Store": b"\x00\x00\x00\x01Bud1",
              "cats/.DS_Store": b"Bud1", "cats/Thumbs.db": b"\xd0\xcf", "dogs/desktop.ini": b"[.ShellClassInfo]",
              "dogs/.hidden/00.png": png(rng), ".git/config": b"[core]"}
    work = tmp_path / "work"
    dataset = ingest(write_zip(tmp_path / "data.zip", {**files, **litter}), work, LIMITS)
    assert dataset.skipped == []
    assert dataset.counts() == {"cats": 3, "dogs": 3}
    assert not (work / "__MACOSX").exists()


# --- hostile archives -------------------------------------------------------------------------------------------------


def test_dotdot_entries_skipped_and_nothing_written_outside(rng, tmp_path):
    work = tmp_path / "sandbox" / "work"
    work.parent.mkdir()
    files = images(rng, {"cats": 2, "dogs": 2})
    evil = {"../escape.png": png(rng), "cats/../../escape2.png": png(rng), "..\\escape3.png": png(rng),
            "cats/..\\..\\escape4.png": png(rng)}
    archive = write_zip(tmp_path / "data.zip", {**files, **evil})
    before = listing(tmp_path)
    dataset = ingest(archive, work, LIMITS)

    assert sorted(listing(tmp_path)) == sorted(before + ["sandbox/work"] + [f"sandbox/work/{n}" for n in
                                                                             listing(work)])
    assert not list(tmp_path.rglob("escape*"))
    assert {s.path: s.reason for s in dataset.skipped} == dict.fromkeys(evil, "unsafe path (..)")
    assert dataset.counts() == {"cats": 2, "dogs": 2}


def test_absolute_and_drive_letter_entries_skipped(rng, tmp_path):
    target = tmp_path / "abs_escape.png"
    evil = {str(target): png(rng), "C:/Windows/evil.png": png(rng), "\\\\server\\share\\evil.png": png(rng)}
    archive = write_zip(tmp_path / "data.zip", {**images(rng, {"cats": 2, "dogs": 2}), **evil})
    dataset = ingest(archive, tmp_path / "work", LIMITS)
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert reasons[str(target)] == "unsafe path (absolute)"
    assert reasons["C:/Windows/evil.png"] == "unsafe path (drive letter)"
    assert reasons["\\\\server\\share\\evil.png"] == "unsafe path (absolute)"
    assert not target.exists()


def test_tar_absolute_and_dotdot_entries_skipped(rng, tmp_path):
    target = tmp_path / "abs_escape.png"
    extra = [tar_file(str(target), png(rng)), tar_file("../escape.png", png(rng))]
    archive = write_tar(tmp_path / "data.tgz", images(rng, {"cats": 2, "dogs": 2}), extra=extra)
    before = listing(tmp_path)
    dataset = ingest(archive, tmp_path / "work", LIMITS)
    assert {s.reason for s in dataset.skipped} == {"unsafe path (absolute)", "unsafe path (..)"}
    assert not target.exists() and not list(tmp_path.rglob("escape*"))
    assert [p for p in listing(tmp_path) if not p.startswith("work")] == before


def test_zip_symlink_entry_skipped(rng, tmp_path):
    archive = write_zip(tmp_path / "data.zip", images(rng, {"cats": 2, "dogs": 2}))
    with zipfile.ZipFile(archive, "a") as zf:
        link = zipfile.ZipInfo("cats/passwd.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("dogs/pipe")
        fifo.create_system = 3
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, "")
    work = tmp_path / "work"
    dataset = ingest(archive, work, LIMITS)
    assert set(dataset.skipped) == {Skipped("cats/passwd.png", "symlink"), Skipped("dogs/pipe", "special file")}
    assert not any(p.is_symlink() for p in work.rglob("*"))
    assert not (work / "cats" / "passwd.png").exists()


def test_tar_symlink_hardlink_and_special_files_skipped(rng, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    extra = [tar_special("cats/escape", tarfile.SYMTYPE, str(outside)),
             tar_file("cats/escape/planted.png", png(rng)),  # would land outside if the link had been made
             tar_special("dogs/hard.png", tarfile.LNKTYPE, "/etc/passwd"),
             tar_special("dogs/fifo", tarfile.FIFOTYPE),
             tar_special("dogs/tty", tarfile.CHRTYPE)]
    work = tmp_path / "work"
    dataset = ingest(write_tar(tmp_path / "data.tar.gz", images(rng, {"cats": 2, "dogs": 2}), extra=extra), work,
                     LIMITS)
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert reasons == {"cats/escape": "symlink", "dogs/hard.png": "link", "dogs/fifo": "special file",
                       "dogs/tty": "special file"}
    assert list(outside.iterdir()) == []
    assert not any(p.is_symlink() for p in work.rglob("*"))
    assert (work / "cats" / "escape" / "planted.png").is_file()  # a plain folder inside work, not a link


def test_directory_symlinks_not_followed(rng, tmp_path):
    outside = write_tree(tmp_path / "outside", images(rng, {"secret": 3}))
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 2, "dogs": 2}))
    (root / "cats" / "linked").symlink_to(outside / "secret")
    (root / "dogs" / "one.png").symlink_to(outside / "secret" / "00.png")
    dataset = ingest(root, limits=LIMITS)
    assert set(dataset.skipped) == {Skipped("cats/linked", "symlink"), Skipped("dogs/one.png", "symlink")}
    assert dataset.counts() == {"cats": 2, "dogs": 2}


def test_zip_bomb_by_ratio(rng, tmp_path):
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/bomb.png": bytes(8 * 2**20)}
    work = tmp_path / "work"
    with pytest.raises(ArchiveError, match="compression ratio"):
        ingest(write_zip(tmp_path / "bomb.zip", files), work, LIMITS)
    assert not work.exists()


def test_tar_gz_bomb_by_ratio(rng, tmp_path):
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/bomb.png": bytes(8 * 2**20)}
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ArchiveError, match="compression ratio"):
        ingest(write_tar(tmp_path / "bomb.tar.gz", files), work, LIMITS)
    assert work.is_dir() and list(work.iterdir()) == []  # the caller's folder stays, emptied


def test_tar_pax_header_bomb_stopped_while_streaming(tmp_path):
    info = tarfile.TarInfo("cats/x.png")
    info.pax_headers = {"comment": "0" * (6 * 2**20)}  # metadata tarfile would read into memory at once
    with tarfile.open(tmp_path / "pax.tar.gz", "w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO())
    with pytest.raises(ArchiveError, match="compression ratio"):
        ingest(tmp_path / "pax.tar.gz", tmp_path / "work")


def test_small_compressible_files_are_not_a_bomb(rng, tmp_path):
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/blank.png": bytes(500_000)}
    dataset = ingest(write_zip(tmp_path / "data.zip", files), tmp_path / "work", LIMITS)
    assert Skipped("cats/blank.png", "not an image in an allowed format (JPEG, PNG, WEBP, BMP, GIF, TIFF)") in \
        dataset.skipped


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_by_total_size(rng, tmp_path, kind):
    files = {**images(rng, {"cats": 2, "dogs": 2}), "cats/big.png": rng.bytes(200_000)}  # incompressible
    archive = (write_zip(tmp_path / "big.zip", files) if kind == "zip"
               else write_tar(tmp_path / "big.tar.gz", files))
    work = tmp_path / "work"
    with pytest.raises(ArchiveError, match="more than 100000 bytes"):
        ingest(archive, work, IngestLimits(max_total_bytes=100_000, min_images_per_class=2))
    assert not work.exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_entries(rng, tmp_path, kind):
    files = {f"cats/{n}.txt": b"x" for n in range(30)}
    archive = write_zip(tmp_path / "many.zip", files) if kind == "zip" else write_tar(tmp_path / "many.tar", files,
                                                                                       "w")
    work = tmp_path / "work"
    with pytest.raises(ArchiveError, match="more than 10 entries"):
        ingest(archive, work, IngestLimits(max_entries=10))
    assert not work.exists()


def test_bad_crc_entry_skipped_rest_goes_on(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    blob = bytearray(write_zip(tmp_path / "ok.zip", files, zipfile.ZIP_STORED).read_bytes())
    victim = files["cats/01.png"]
    at = bytes(blob).find(victim) + len(victim) // 2
    blob[at] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(blob))
    work = tmp_path / "work"
    dataset = ingest(tmp_path / "crc.zip", work, LIMITS)
    assert dataset.skipped == [Skipped("cats/01.png", "corrupt archive entry (bad CRC)")]
    assert dataset.counts() == {"cats": 2, "dogs": 3}
    assert not (work / "cats" / "01.png").exists()  # no half-written file left behind


def test_encrypted_zip_entry_skipped(rng, tmp_path):
    files = images(rng, {"cats": 3, "dogs": 3})
    blob = patch_zip_flags(write_zip(tmp_path / "ok.zip", files).read_bytes(), "dogs/00.png", set_bits=0x1)
    (tmp_path / "enc.zip").write_bytes(blob)
    dataset = ingest(tmp_path / "enc.zip", tmp_path / "work", LIMITS)
    assert dataset.skipped == [Skipped("dogs/00.png", "encrypted archive entry")]
    assert dataset.counts() == {"cats": 3, "dogs": 2}


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case", ["garbage.zip", "truncated.zip", "truncated.tar.gz", "gzip-not-tar.tar.gz",
                                  "garbage.tgz"])
def test_invalid_archives_rejected(rng, tmp_path, case):
    files = images(rng, {"cats": 5, "dogs": 5})
    path = tmp_path / case
    if case.startswith("garbage"):
        path.write_bytes(rng.bytes(4096))
    elif case == "truncated.zip":
        _truncated(write_zip(path, files, zipfile.ZIP_STORED))
    elif case == "truncated.tar.gz":
        _truncated(write_tar(path, files))
    else:
        import gzip

        path.write_bytes(gzip.compress(b"hello, not a tar file" * 100))
    work = tmp_path / "work"
    with pytest.raises(ArchiveError, match=r"not a valid \.zip/\.tar\.gz archive") as caught:
        ingest(path, work)
    assert "\n" not in caught.value.message
    assert not work.exists()


def test_unsupported_file_rejected_before_workdir_is_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("cats and dogs")
    with pytest.raises(ArchiveError, match="not a supported dataset"):
        ingest(tmp_path / "notes.txt", tmp_path / "work")
    with pytest.raises(ArchiveError, match="does not exist"):
        ingest(tmp_path / "missing.zip", tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_workdir_required_for_archives_and_must_be_empty(rng, tmp_path):
    archive = write_zip(tmp_path / "data.zip", images(rng, {"cats": 5, "dogs": 5}))
    with pytest.raises(ValueError, match="workdir"):
        ingest(archive)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="workdir"):
        ingest(archive, busy)
    assert (busy / "keep.txt").read_text() == "mine"


def test_entry_name_clashes_skipped(rng, tmp_path):
    files = images(rng, {"cats": 2, "dogs": 2})
    archive = write_zip(tmp_path / "data.zip", files)
    with zipfile.ZipFile(archive, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("cats/00.png", png(rng))  # a second entry with the same name must not overwrite the first
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("dogs/00.png/inner.png", png(rng))  # needs a folder where a file already is
    work = tmp_path / "work"
    dataset = ingest(archive, work, LIMITS)
    assert {s.path: s.reason for s in dataset.skipped} == {
        "cats/00.png": "name clashes with another entry",
        "dogs/00.png/inner.png": "name clashes with another entry"}
    assert (work / "cats" / "00.png").read_bytes() == files["cats/00.png"]
    assert dataset.counts() == {"cats": 2, "dogs": 2}


def test_unpack_archive_returns_skipped_and_stays_inside_dest(rng, tmp_path):
    files = {**images(rng, {"cats": 1}), "../x.png": b"x", "cats/": b""}
    dest = tmp_path / "dest"
    skipped = unpack_archive(write_zip(tmp_path / "a.zip", files), dest, IngestLimits())
    assert skipped == [Skipped("../x.png", "unsafe path (..)")]
    assert listing(dest) == ["cats", "cats/00.png"]


# --- files in class folders -------------------------------------------------------------------------------------------


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


# --- validation -------------------------------------------------------------------------------------------------------


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


# --- report and id ----------------------------------------------------------------------------------------------------


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


def test_scan_directory_accepts_prior_skips(rng, tmp_path):
    root = write_tree(tmp_path / "ds", images(rng, {"cats": 2, "dogs": 2}))
    dataset = scan_directory(root, LIMITS, [Skipped("zz/link", "symlink")])
    assert dataset.skipped == [Skipped("zz/link", "symlink")]
    assert os.path.commonpath([str(i.path) for i in dataset.items]) == str(root.resolve())
