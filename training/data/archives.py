"""Safe unpacking of dataset archives (.zip, .tar.gz, .tar) that come from the internet.

Archives are unpacked member by member (never `extractall`): every path is checked against
the destination, links and special files are refused, and the entry count, total size and
compression ratio are counted on the bytes actually produced while streaming, so a zip bomb
stops after about a megabyte instead of filling the disk. An entry that is unsafe or corrupt is
left out and listed with its reason (a `Skipped`); an archive that is not valid or breaks a
limit raises `ArchiveError` and leaves nothing of it behind.

Messages name the archive by `name` (the file name the user gave it) when one is passed, since
a stored upload's own file name means nothing to them.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import nullcontext, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import IO

from training.data.dataset import IngestLimits, Skipped
from training.errors import ArchiveError

# Bytes read at a time from an upload or archive member (also the dataset store's copy loop).
CHUNK_BYTES = 2**20
# Small files legitimately compress far beyond any sane ratio (blank images, text);
# a bomb only matters once it has produced real volume.
_RATIO_FLOOR = 2**20
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors that mean "the disk is in trouble", not "this entry is bad": never skipped.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_CORRUPT_ENTRY = (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, NotImplementedError)
_BROKEN_STREAM = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# Hidden files and OS litter are neither unpacked nor reported.
_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})


def archive_kind(path: Path, name: str | None = None) -> str:
    """Tell a zip, a gzipped tar and a plain tar apart by their magic bytes; refuse anything else.

    Cheap (it reads 512 bytes), so the upload checks it before answering.
    """
    name = name or path.name
    if not path.is_file():
        what = "is not a folder or an archive" if path.exists() else "does not exist"
        raise ArchiveError(f"dataset '{name}' {what}")
    with path.open("rb") as file:
        head = file.read(512)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    if name.lower().endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        raise ArchiveError(f"not a valid .zip/.tar.gz archive: '{name}' does not start like one")
    raise ArchiveError(f"'{name}' is not a supported dataset: upload a .zip or .tar.gz of one folder per class")


def unpack_archive(archive: Path, dest: Path, limits: IngestLimits, name: str | None = None) -> list[Skipped]:
    """Unpack a .zip / .tar.gz / .tar into `dest` (new or empty); return the entries left out.

    Raises ArchiveError for an archive that is not valid or breaks a limit, and then
    leaves nothing of it behind.
    """
    archive, dest = Path(archive), Path(dest)
    name = name or archive.name
    kind = archive_kind(archive, name)
    created = prepare_dest(dest, "dest")
    try:
        if kind == "zip":
            skipped = _unpack_zip(archive, dest.resolve(), limits, name)
        else:
            skipped = _unpack_tar(archive, dest.resolve(), limits, kind, name)
    except BaseException:
        clear_dest(dest, created)
        raise
    return sorted(skipped, key=lambda s: s.path)


def prepare_dest(path: Path, name: str) -> bool:
    """Make sure `path` is a new or empty folder (so cleanup cannot hit other files); return whether it was created."""
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise ValueError(f"{name} must be a new or empty folder, received: {path}")
        return False
    path.mkdir(parents=True)
    return True


def clear_dest(path: Path, created: bool) -> None:
    """Remove everything under `path` (it was empty before), and `path` itself if we created it."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if created:
        with suppress(OSError):
            path.rmdir()


def is_junk(name: str) -> bool:
    """Hidden files and OS litter, ignored without a word."""
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _unpack_zip(archive: Path, dest: Path, limits: IngestLimits, name: str) -> list[Skipped]:
    """Stream every zip entry to disk, counting the bytes each one really produces."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(_invalid(name, exc)) from None
    skipped: list[Skipped] = []
    archive_size = archive.stat().st_size
    total = 0
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise ArchiveError(f"archive has more than {limits.max_entries} entries")
        for info in infos:
            total += _unpack_zip_entry(zf, info, dest, limits, total, archive_size, skipped)
    return skipped


def _unpack_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, limits: IngestLimits,
                      total: int, archive_size: int, skipped: list[Skipped]) -> int:
    """Unpack one zip entry, or note why not; return the bytes it produced."""
    name = _zip_name(info)
    target = _target(name, dest, skipped)
    if target is None:
        return 0
    kind = stat.S_IFMT(info.external_attr >> 16)
    if name.replace("\\", "/").endswith("/") or kind == stat.S_IFDIR:
        _make_dir(target, name, skipped)
        return 0
    reason = _zip_refusal(info, kind)
    if reason:
        skipped.append(Skipped(name, reason))
        return 0

    def check(produced: int) -> None:
        _check_volume(total + produced, archive_size, limits)
        _check_ratio(produced, info.compress_size, limits)

    return _extract(name, target, lambda: zf.open(info), check, skipped)


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The entry name, re-read as UTF-8 when the zip did not flag it (macOS and many tools don't)."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _zip_refusal(info: zipfile.ZipInfo, kind: int) -> str | None:
    """Why a zip file entry is not unpacked (links, special files, encryption), or None."""
    if kind == stat.S_IFLNK:
        return "symlink"
    if kind not in (0, stat.S_IFREG):
        return "special file"
    if info.flag_bits & 0x1:
        return "encrypted archive entry"
    return None


def _unpack_tar(archive: Path, dest: Path, limits: IngestLimits, kind: str, name: str) -> list[Skipped]:
    """Stream a tar (gzipped or not) member by member; limits are checked on the decompressed stream."""
    skipped: list[Skipped] = []
    try:
        with archive.open("rb") as raw, (gzip.GzipFile(fileobj=raw) if kind == "tar.gz" else nullcontext(raw)) as plain:
            stream = _limited_reader(plain, archive.stat().st_size, limits)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for count, member in enumerate(tar, 1):
                    if count > limits.max_entries:
                        raise ArchiveError(f"archive has more than {limits.max_entries} entries")
                    _unpack_tar_member(tar, member, dest, skipped)
    except _BROKEN_STREAM as exc:
        raise ArchiveError(_invalid(name, exc)) from None
    return skipped


def _limited_reader(plain: IO[bytes], archive_size: int, limits: IngestLimits) -> SimpleNamespace:
    """Wrap a stream for tarfile so every byte it decompresses, headers included, counts toward the limits."""
    produced = 0

    def read(size: int = -1) -> bytes:
        nonlocal produced
        # Bounded reads: tarfile asks for a whole pax header at once, which could be gigabytes.
        data = plain.read(CHUNK_BYTES if size is None or size < 0 else min(size, CHUNK_BYTES))
        produced += len(data)
        _check_volume(produced, archive_size, limits)
        return data

    return SimpleNamespace(read=read)


def _unpack_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, skipped: list[Skipped]) -> None:
    """Unpack one tar member, or note why not."""
    target = _target(member.name, dest, skipped)
    if target is None:
        return
    if member.isdir():
        _make_dir(target, member.name, skipped)
        return
    if member.issym():
        skipped.append(Skipped(member.name, "symlink"))
    elif member.islnk():
        skipped.append(Skipped(member.name, "link"))
    elif not member.isreg():
        skipped.append(Skipped(member.name, "special file"))
    else:
        # The stream wrapper already counts these bytes.
        _extract(member.name, target, lambda: tar.extractfile(member), lambda produced: None, skipped)


def _check_volume(total: int, archive_size: int, limits: IngestLimits) -> None:
    """Stop an archive whose output so far is over the size limit or the overall compression ratio."""
    if total > limits.max_total_bytes:
        raise ArchiveError(f"archive unpacks to more than {_size(limits.max_total_bytes)}, the limit")
    _check_ratio(total, archive_size, limits)


def _check_ratio(produced: int, compressed: int, limits: IngestLimits) -> None:
    """Stop output that is far larger than its compressed input (a likely zip bomb)."""
    if produced >= _RATIO_FLOOR and produced > limits.max_compression_ratio * max(compressed, 1):
        raise ArchiveError(f"archive compression ratio is over {limits.max_compression_ratio}:1, "
                           "the limit (a likely zip bomb)")


def _target(name: str, dest: Path, skipped: list[Skipped]) -> Path | None:
    """Where an entry goes under `dest`; None to leave it out (noted when unsafe, silent for junk)."""
    clean = name.replace("\\", "/")  # Windows tools write backslashes; '..\\' must not slip through
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    problem = ("absolute" if clean.startswith("/") else "drive letter" if _DRIVE.match(clean)
               else ".." if ".." in parts else None)
    if problem is None and parts and not _is_within(dest.joinpath(*parts), dest):
        problem = "outside the destination"
    if problem:
        skipped.append(Skipped(name, f"unsafe path ({problem})"))
        return None
    if not parts or any(is_junk(p) for p in parts):
        return None
    return dest.joinpath(*parts)


def _is_within(path: Path, root: Path) -> bool:
    """Whether `path`, with every link resolved, is strictly inside the resolved folder `root`."""
    real = Path(os.path.realpath(path))
    return real != root and real.is_relative_to(root)


def _make_dir(target: Path, name: str, skipped: list[Skipped]) -> None:
    """Create a folder entry (an empty class folder still counts as a class)."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        skipped.append(Skipped(name, f"cannot create folder ({exc.strerror})"))


def _extract(name: str, target: Path, open_source: Callable[[], IO[bytes]], check: Callable[[int], None],
             skipped: list[Skipped]) -> int:
    """Write one file entry; a corrupt or unwritable entry is skipped and the rest goes on."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_source() as source:
            return _write_new_file(target, source, check)
    except FileExistsError:
        reason = "name clashes with another entry"
    except _CORRUPT_ENTRY as exc:
        reason = _corrupt_reason(exc)
    except OSError as exc:
        # Decompressors raise errno-less OSErrors for bad data; errors with an errno come from the disk.
        if exc.errno in DISK_ERRNOS:
            raise
        reason = _corrupt_reason(exc) if exc.errno is None else f"cannot write entry ({exc.strerror})"
    skipped.append(Skipped(name, reason))
    return 0


def _write_new_file(target: Path, source: IO[bytes], check: Callable[[int], None]) -> int:
    """Copy `source` into a new file (never through a link), calling `check` with the running size."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    produced = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                produced += len(chunk)
                check(produced)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return produced


def _corrupt_reason(exc: BaseException) -> str:
    """A one-line reason for an entry that cannot be read."""
    if isinstance(exc, NotImplementedError):
        return "unsupported compression method"
    if "CRC" in str(exc):
        return "corrupt archive entry (bad CRC)"
    return f"corrupt archive entry ({_one_line(exc)})"


def _invalid(name: str, exc: BaseException) -> str:
    """The message for a file that is not a readable archive at all."""
    return f"not a valid .zip/.tar.gz archive: '{name}' is truncated or corrupt ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"
