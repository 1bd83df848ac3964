"""Safe dataset ingest: unpack an upload, find the classes, check every image.

A dataset is one folder per class (optionally under `train/` and `val/`), given as a
folder on disk or as a .zip / .tar.gz / .tar archive. Archives come from the
internet, so they are unpacked member by member (never `extractall`): every path is
checked against the destination, links and special files are refused, and the entry
count, total size and compression ratio are counted on the bytes actually produced
while streaming, so a zip bomb stops after about a megabyte instead of filling the
disk. Every file in a class folder is fully decoded by the decoder serving uses.
Exact duplicates are dropped, and images filed under two labels are dropped
entirely, because either label would be wrong for one of them.

Paths in `Skipped`, `duplicates` and `conflicts` are POSIX paths relative to the
folder that was scanned (the archive root for an upload), so they match the names
the user sees in their archive.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING

from training.errors import ArchiveError, DatasetError, ImageError
from training.images import decode_image

if TYPE_CHECKING:
    from training.settings import Settings

# Bytes read at a time from an upload or archive member (also the dataset store's copy loop).
CHUNK_BYTES = 2**20
# Small files legitimately compress far beyond any sane ratio (blank images, text);
# a bomb only matters once it has produced real volume.
_RATIO_FLOOR = 2**20
_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
# Train copies sort first so a train/val duplicate keeps the train copy.
_SPLIT_RANK = {None: 0, "train": 0, "val": 1}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_NESTED_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".7z", ".rar", ".bz2", ".xz")
_NESTED_MAGIC = (*_ZIP_MAGIC, b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"BZh", b"\xfd7zXZ\x00")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors that mean "the disk is in trouble", not "this entry is bad": never skipped.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_CORRUPT_ENTRY = (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, NotImplementedError)
_BROKEN_STREAM = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_FEW_IMAGES = 20
_IMBALANCE = 3


@dataclass(frozen=True)
class IngestLimits:
    """Limits that keep a hostile upload from exhausting disk, memory or time."""

    max_entries: int = 100_000
    max_total_bytes: int = 4096 * 2**20
    max_compression_ratio: int = 200
    max_image_pixels: int = 50_000_000
    min_images_per_class: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestLimits:
        """Take the limits from the service settings."""
        return cls(max_entries=settings.max_archive_entries, max_total_bytes=settings.max_archive_mb * 2**20,
                   max_compression_ratio=settings.max_compression_ratio,
                   max_image_pixels=settings.max_image_pixels, min_images_per_class=settings.min_images_per_class)


@dataclass(frozen=True)
class Item:
    """One usable image."""

    path: Path
    label: str
    sha256: str
    split: str | None


@dataclass(frozen=True)
class Skipped:
    """A file or archive entry left out of the dataset, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """The usable images of a dataset plus everything that was left out."""

    root: Path
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Content id: the same labeled images give the same id, however they were packed."""
        lines = sorted(json.dumps([i.label, i.split, i.sha256], ensure_ascii=False) for i in self.items)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        """Images per class, in class order (classes without images included)."""
        counts = dict.fromkeys(self.classes, 0)
        for item in self.items:
            counts[item.label] = counts.get(item.label, 0) + 1
        return counts

    def has_split(self) -> bool:
        """Whether the dataset came with train/ (and val/) folders."""
        return any(item.split is not None for item in self.items)

    def report(self) -> dict:
        """A JSON-able summary for the user."""
        return {"id": self.id, "classes": self.counts(), "images": len(self.items),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
                "duplicates": [dict(d) for d in self.duplicates],
                "conflicts": [{**c, "paths": list(c["paths"]), "labels": list(c["labels"])} for c in self.conflicts],
                "warnings": list(self.warnings)}


@contextmanager
def work_folder(data_dir: str | Path, prefix: str) -> Iterator[str]:
    """A new temporary folder under DATA_DIR/tmp, removed with what it holds on exit.

    Under DATA_DIR rather than /tmp: unpacked datasets can be large, and DATA_DIR is the
    disk sized for them.
    """
    root = Path(data_dir) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=prefix) as folder:
        yield folder


def ingest(source: str | Path, workdir: str | Path | None = None, limits: IngestLimits = IngestLimits()) -> Dataset:
    """Turn a folder or an uploaded archive into a validated Dataset.

    A folder is scanned in place and never modified. An archive is unpacked into
    `workdir` (a new or empty folder), which is emptied again if ingest fails.
    """
    source = Path(source)
    if source.is_dir():
        return scan_directory(source, limits)
    _archive_kind(source)  # refuse a non-archive before touching workdir
    if workdir is None:
        raise ValueError("workdir is required to unpack an archive, received: None")
    workdir = Path(workdir)
    created = _prepare_dest(workdir, "workdir")
    try:
        skipped = unpack_archive(source, workdir, limits)
        return scan_directory(workdir, limits, skipped)
    except BaseException:
        _clear(workdir, created)
        raise


def unpack_archive(archive: Path, dest: Path, limits: IngestLimits) -> list[Skipped]:
    """Unpack a .zip / .tar.gz / .tar into `dest` (new or empty); return the entries left out.

    Raises ArchiveError for an archive that is not valid or breaks a limit, and then
    leaves nothing of it behind.
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)
    created = _prepare_dest(dest, "dest")
    try:
        if kind == "zip":
            skipped = _unpack_zip(archive, dest.resolve(), limits)
        else:
            skipped = _unpack_tar(archive, dest.resolve(), limits, kind)
    except BaseException:
        _clear(dest, created)
        raise
    return sorted(skipped, key=lambda s: s.path)


def scan_directory(root: Path, limits: IngestLimits, skipped: list[Skipped] | None = None) -> Dataset:
    """Find the classes under `root`, check every file, drop duplicates and validate the result.

    `root` is only read. `skipped` carries entries already left out by `unpack_archive`.
    Raises DatasetError when the dataset cannot be trained on.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root.name}' does not exist")
    skipped = list(skipped or [])
    candidates, classes = _find_candidates(root, skipped)
    results = _check_files([path for _, _, path in candidates], limits)
    good = []
    for (label, split, path), (digest, reason) in zip(candidates, results, strict=True):
        if reason:
            skipped.append(Skipped(_rel(path, root), reason))
        else:
            good.append((label, split, path, digest))
    items, duplicates, conflicts = _dedupe(good, root, skipped)
    dataset = Dataset(root, sorted(classes), items, sorted(skipped, key=lambda s: s.path), duplicates, conflicts)
    _validate(dataset, limits)
    dataset.warnings = _warnings(dataset)
    return dataset


# --- archives -----------------------------------------------------------------------------------------------------


def _archive_kind(path: Path) -> str:
    """Tell a zip, a gzipped tar and a plain tar apart by their magic bytes; refuse anything else."""
    if not path.is_file():
        what = "is not a folder or an archive" if path.exists() else "does not exist"
        raise ArchiveError(f"dataset '{path.name}' {what}")
    with path.open("rb") as file:
        head = file.read(512)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    if path.name.lower().endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        raise ArchiveError(f"not a valid .zip/.tar.gz archive: '{path.name}' does not start like one")
    raise ArchiveError(f"'{path.name}' is not a supported dataset: upload a .zip or .tar.gz of one folder per class")


def _prepare_dest(path: Path, name: str) -> bool:
    """Make sure `path` is a new or empty folder (so cleanup cannot hit other files); return whether it was created."""
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise ValueError(f"{name} must be a new or empty folder, received: {path}")
        return False
    path.mkdir(parents=True)
    return True


def _clear(path: Path, created: bool) -> None:
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


def _unpack_zip(archive: Path, dest: Path, limits: IngestLimits) -> list[Skipped]:
    """Stream every zip entry to disk, counting the bytes each one really produces."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(_invalid(archive, exc)) from None
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


def _unpack_tar(archive: Path, dest: Path, limits: IngestLimits, kind: str) -> list[Skipped]:
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
        raise ArchiveError(_invalid(archive, exc)) from None
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
    if not parts or any(_is_junk(p) for p in parts):
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
        if exc.errno in _DISK_ERRNOS:
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
        if exc.errno in _DISK_ERRNOS:
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


def _invalid(archive: Path, exc: BaseException) -> str:
    """The message for a file that is not a readable archive at all."""
    return f"not a valid .zip/.tar.gz archive: '{archive.name}' is truncated or corrupt ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"


# --- layout -------------------------------------------------------------------------------------------------------


def _find_candidates(root: Path, skipped: list[Skipped]) -> tuple[list[tuple[str, str | None, Path]], set[str]]:
    """Every file in a class folder as (label, split, path), and the set of class names."""
    candidates: list[tuple[str, str | None, Path]] = []
    classes: set[str] = set()
    for split, folder in _find_layout(root, skipped):
        # macOS writes decomposed Unicode names; one class must not become two.
        label = unicodedata.normalize("NFC", folder.name)
        files = _walk_files(folder, root, skipped)
        if not label.strip():
            skipped.extend(Skipped(_rel(f, root), "class folder name is blank") for f in files)
            continue
        classes.add(label)
        candidates.extend((label, split, f) for f in files)
    return candidates, classes


def _find_layout(root: Path, skipped: list[Skipped]) -> list[tuple[str | None, Path]]:
    """(split, class folder) pairs, descending through lone wrapper folders such as a zipped parent folder."""
    base = root
    while True:
        dirs, files = _list_dir(base, root, skipped)
        if any(d.name.lower() == "train" for d in dirs):
            return _split_layout(dirs, files, root, skipped)
        _not_in_class(files, root, skipped)
        if len(dirs) == 1 and not _has_images(files) and _is_wrapper(dirs[0]):
            base = dirs[0]
            continue
        return [(None, d) for d in dirs]


def _is_wrapper(folder: Path) -> bool:
    """A lone folder holding folders and no images wraps the dataset; one holding images is a (single) class."""
    dirs, files = _list_dir(folder, folder, [])
    return bool(dirs) and not _has_images(files)


def _has_images(files: list[Path]) -> bool:
    return any(_looks_like_image(f) for f in files)


def _split_layout(dirs: list[Path], files: list[Path], root: Path,
                  skipped: list[Skipped]) -> list[tuple[str | None, Path]]:
    """Class folders under train/ and val/ (or validation/, valid/); files elsewhere are left out."""
    _not_in_class(files, root, skipped)
    pairs: list[tuple[str | None, Path]] = []
    for folder in dirs:
        split = _SPLIT_NAMES.get(folder.name.lower())
        if split is None:
            outside = _walk_files(folder, root, skipped)
            skipped.extend(Skipped(_rel(f, root), "outside train/ and val/") for f in outside)
            continue
        class_dirs, loose = _list_dir(folder, root, skipped)
        _not_in_class(loose, root, skipped)
        pairs.extend((split, c) for c in class_dirs)
    return pairs


def _not_in_class(files: list[Path], root: Path, skipped: list[Skipped]) -> None:
    skipped.extend(Skipped(_rel(f, root), "not in a class folder") for f in files)


def _list_dir(folder: Path, root: Path, skipped: list[Skipped]) -> tuple[list[Path], list[Path]]:
    """A folder's visible subfolders and regular files, sorted; links and special files are noted, never followed."""
    dirs: list[Path] = []
    files: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            listing = sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        skipped.append(Skipped(_rel(folder, root), f"cannot read folder ({exc.strerror})"))
        return dirs, files
    for entry in listing:
        path = Path(entry.path)
        if _is_junk(entry.name):
            continue
        if entry.is_symlink():
            skipped.append(Skipped(_rel(path, root), "symlink"))
        elif entry.is_dir(follow_symlinks=False):
            dirs.append(path)
        elif entry.is_file(follow_symlinks=False):
            files.append(path)
        else:
            skipped.append(Skipped(_rel(path, root), "special file"))
    return dirs, files


def _walk_files(folder: Path, root: Path, skipped: list[Skipped]) -> list[Path]:
    """All regular files under `folder` at any depth (iterative: archives can nest folders thousands deep)."""
    found: list[Path] = []
    stack = [folder]
    while stack:
        dirs, files = _list_dir(stack.pop(), root, skipped)
        found.extend(files)
        stack.extend(dirs)
    return sorted(found)


def _is_junk(name: str) -> bool:
    """Hidden files and OS litter, ignored without a word."""
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _looks_like_image(path: Path) -> bool:
    """A cheap sniff of the first bytes, only to decide whether a folder is a wrapper."""
    try:
        with path.open("rb") as file:
            head = file.read(16)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --- images -------------------------------------------------------------------------------------------------------


def _check_files(paths: list[Path], limits: IngestLimits) -> list[tuple[str, str | None]]:
    """(sha256, reason or None) per path, in order; decoding runs in threads since Pillow releases the GIL."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda path: _check_file(path, limits), paths))


def _check_file(path: Path, limits: IngestLimits) -> tuple[str, str | None]:
    """Read and fully decode one file; return its sha256 and why it is unusable (None when usable)."""
    # Generous for any real image of the allowed size; keeps threads from reading huge files into memory.
    max_bytes = limits.max_image_pixels * 8 + CHUNK_BYTES
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return "", f"file too large for an image ({size} bytes)"
        data = path.read_bytes()
    except OSError as exc:
        return "", f"cannot read file ({exc.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(_NESTED_MAGIC) or path.name.lower().endswith(_NESTED_SUFFIXES):
        return digest, "nested archive (not supported)"
    try:
        decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        return digest, exc.message
    return digest, None


def _dedupe(good: list[tuple[str, str | None, Path, str]], root: Path,
            skipped: list[Skipped]) -> tuple[list[Item], list[dict], list[dict]]:
    """Keep one copy of each image; drop every copy of an image that appears under two or more labels."""
    groups: dict[str, list[tuple[str, str | None, Path, str]]] = defaultdict(list)
    for entry in sorted(good, key=lambda g: (_SPLIT_RANK[g[1]], _rel(g[2], root))):
        groups[entry[3]].append(entry)
    items: list[Item] = []
    duplicates: list[dict] = []
    conflicts: list[dict] = []
    for digest, group in groups.items():
        paths = [_rel(g[2], root) for g in group]
        labels = sorted({g[0] for g in group})
        if len(labels) > 1:
            conflicts.append({"sha256": digest, "paths": sorted(paths), "labels": labels})
            skipped.extend(Skipped(p, f"same image under labels {_names(labels)}") for p in paths)
            continue
        label, split, path, _ = group[0]
        items.append(Item(path, label, digest, split))
        for copy in paths[1:]:
            duplicates.append({"path": copy, "duplicate_of": paths[0]})
            skipped.append(Skipped(copy, f"duplicate of {paths[0]}"))
    items.sort(key=lambda i: (i.label, i.path))
    duplicates.sort(key=lambda d: d["path"])
    conflicts.sort(key=lambda c: c["paths"][0])
    return items, duplicates, conflicts


# --- validation ---------------------------------------------------------------------------------------------------


def _validate(dataset: Dataset, limits: IngestLimits) -> None:
    """Raise DatasetError, naming the classes at fault, when the dataset cannot be trained on."""
    counts = dataset.counts()
    if sum(1 for n in counts.values() if n) < 2:
        found = ", ".join(f"'{c}' ({n} images)" for c, n in counts.items()) or "no class folders"
        raise DatasetError(f"a dataset needs at least 2 classes with images, one folder per class; "
                           f"found {found}{_skip_hint(dataset.skipped)}")
    small = [c for c in dataset.classes if counts[c] < limits.min_images_per_class]
    if small:
        first, *rest = small
        listed = ", ".join([f"class '{first}' has {_images(counts[first])}"] + [f"'{c}' has {counts[c]}" for c in rest])
        raise DatasetError(f"{listed}; each class needs at least {limits.min_images_per_class}"
                           f"{_skip_hint(dataset.skipped)}")
    if dataset.has_split():
        trained = {i.label for i in dataset.items if i.split == "train"}
        untrained = [c for c in dataset.classes if c not in trained]
        if untrained:
            raise DatasetError(f"no images in train/ for {_names(untrained)}; each class needs at least 1 "
                               "training image")


def _warnings(dataset: Dataset) -> list[str]:
    """Things that do not stop training but make a worse model."""
    counts = dataset.counts()
    notes = []
    largest, smallest = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
    if counts[largest] > _IMBALANCE * counts[smallest]:
        notes.append(f"classes are imbalanced: '{largest}' has {counts[largest]} images, '{smallest}' has "
                     f"{counts[smallest]} (more than {_IMBALANCE}x); predictions will lean toward larger classes")
    few = [c for c in dataset.classes if counts[c] < _FEW_IMAGES]
    if few:
        notes.append(f"few images in {_names(few)}: {_FEW_IMAGES} or more per class usually give a better model")
    if dataset.has_split():
        validated = {i.label for i in dataset.items if i.split == "val"}
        unvalidated = [c for c in dataset.classes if c not in validated]
        if validated and unvalidated:
            notes.append(f"no images in val/ for {_names(unvalidated)}")
    return notes


def _skip_hint(skipped: list[Skipped]) -> str:
    """Point at the most common skip reason, since skipped files are often why a class came up short."""
    if not skipped:
        return ""
    reason, _ = Counter(s.reason for s in skipped).most_common(1)[0]
    return f" ({len(skipped)} files were skipped, most often: {reason})"


def _names(labels: list[str]) -> str:
    return ", ".join(f"'{label}'" for label in labels)


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"
