"""Ingest: turn a folder or an uploaded archive into a validated `Dataset`.

A dataset is one folder per class (optionally under `train/` and `val/`), given as a folder
on disk or as a .zip / .tar.gz / .tar archive (unpacked safely by `training.data.archives`).
Every file in a class folder is fully decoded by the decoder serving uses and hashed. Exact
duplicates are dropped, and images filed under two labels are dropped entirely, because
either label would be wrong for one of them. The result is checked against the rules a
training run needs (two classes or more, `min_images_per_class` each).

This is the only place that decodes a dataset's images to check them: the ingest worker runs
it once per upload and writes a manifest, and training reads that manifest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from training.data.archives import (
    CHUNK_BYTES,
    ZIP_MAGIC,
    archive_kind,
    clear_dest,
    is_junk,
    prepare_dest,
    unpack_archive,
)
from training.data.dataset import Dataset, IngestLimits, Item, Skipped
from training.errors import DatasetError, ImageError
from training.images import decode_image

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
# Train copies sort first so a train/val duplicate keeps the train copy.
_SPLIT_RANK = {None: 0, "train": 0, "val": 1}
_NESTED_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".7z", ".rar", ".bz2", ".xz")
_NESTED_MAGIC = (*ZIP_MAGIC, b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"BZh", b"\xfd7zXZ\x00")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_FEW_IMAGES = 20
_IMBALANCE = 3


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


def ingest(source: str | Path, workdir: str | Path | None = None, limits: IngestLimits = IngestLimits(),
           name: str | None = None) -> Dataset:
    """Turn a folder or an uploaded archive into a validated Dataset.

    A folder is scanned in place and never modified. An archive is unpacked into
    `workdir` (a new or empty folder), which is emptied again if ingest fails. `name`
    is what messages call the archive (default: its file name).
    """
    source = Path(source)
    if source.is_dir():
        return scan_directory(source, limits)
    archive_kind(source, name)  # refuse a non-archive before touching workdir
    if workdir is None:
        raise ValueError("workdir is required to unpack an archive, received: None")
    workdir = Path(workdir)
    created = prepare_dest(workdir, "workdir")
    try:
        skipped = unpack_archive(source, workdir, limits, name)
        return scan_directory(workdir, limits, skipped)
    except BaseException:
        clear_dest(workdir, created)
        raise


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
    for (label, split, path), (digest, size, reason) in zip(candidates, results, strict=True):
        if reason:
            skipped.append(Skipped(_rel(path, root), reason))
        else:
            good.append((label, split, path, digest, size))
    items, duplicates, conflicts = _dedupe(good, root, skipped)
    dataset = Dataset(root, sorted(classes), items, sorted(skipped, key=lambda s: s.path), duplicates, conflicts)
    _validate(dataset, limits)
    dataset.warnings = _warnings(dataset)
    return dataset


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
        if is_junk(entry.name):
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


def _check_files(paths: list[Path], limits: IngestLimits) -> list[tuple[str, int, str | None]]:
    """(sha256, size, reason or None) per path, in order; decoding runs in threads since Pillow releases the GIL."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda path: _check_file(path, limits), paths))


def _check_file(path: Path, limits: IngestLimits) -> tuple[str, int, str | None]:
    """Read and fully decode one file; return its sha256, its size and why it is unusable (None when usable)."""
    # Generous for any real image of the allowed size; keeps threads from reading huge files into memory.
    max_bytes = limits.max_image_pixels * 8 + CHUNK_BYTES
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return "", size, f"file too large for an image ({size} bytes)"
        data = path.read_bytes()
    except OSError as exc:
        return "", 0, f"cannot read file ({exc.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(_NESTED_MAGIC) or path.name.lower().endswith(_NESTED_SUFFIXES):
        return digest, len(data), "nested archive (not supported)"
    try:
        decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        return digest, len(data), exc.message
    return digest, len(data), None


# A usable file before deduplication: (label, split, path, sha256, size).
_Good = tuple[str, str | None, Path, str, int]


def _dedupe(good: list[_Good], root: Path, skipped: list[Skipped]) -> tuple[list[Item], list[dict], list[dict]]:
    """Keep one copy of each image; drop every copy of an image that appears under two or more labels."""
    groups: dict[str, list[_Good]] = defaultdict(list)
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
        label, split, path, _, size = group[0]
        items.append(Item(path, label, digest, split, size))
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
