"""Safe unpacking (`training.data.archives`), through `ingest` and alone: good archives of each kind, and
hostile ones built by hand the way an attacker would (escapes, links, bombs, corrupt and encrypted entries).
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.training.data.helpers import (
    LIMITS,
    images,
    listing,
    patch_zip_flags,
    png,
    tar_file,
    tar_special,
    write_tar,
    write_zip,
)
from training.data.archives import archive_kind, unpack_archive
from training.data.dataset import IngestLimits, Skipped
from training.data.ingest import ingest
from training.errors import ArchiveError


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


def test_messages_name_the_archive_as_the_user_called_it(rng, tmp_path):
    stored = tmp_path / "archive"  # as the dataset store keeps an upload
    stored.write_bytes(write_zip(tmp_path / "x.zip", images(rng, {"cats": 5}), zipfile.ZIP_STORED).read_bytes()[:200])
    with pytest.raises(ArchiveError, match="'holiday photos.zip' is truncated or corrupt"):
        ingest(stored, tmp_path / "work", name="holiday photos.zip")
    stored.write_bytes(b"plain text")
    with pytest.raises(ArchiveError, match="'holiday photos.zip' does not start like one"):
        archive_kind(stored, "holiday photos.zip")
    assert archive_kind(write_tar(tmp_path / "t", images(rng, {"cats": 1}), "w")) == "tar"
