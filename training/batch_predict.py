"""Batch prediction: every image of some files, folders and archives, scored and written as CSV or JSONL rows.

Images go through the one inference path (`training.predict`: `load_version`, `backbone_for`,
`LoadedModel.probabilities`, `top_k_labels`) after the one preprocessing function, so a row says what
the service would answer for that image. A file that cannot be read is a row with its reason, never
the end of the run. Memory stays bounded: inputs are read lazily, one batch is decoded by a thread pool
while the model runs on the previous one, and rows leave as each batch is scored.

Archives are unpacked by the project's safe archive code (`training.data.archives`: its limits on
entries, volume and compression ratio, no links, no paths outside) into a temporary folder under
DATA_DIR, removed as soon as its images are read; entries it leaves out become rows with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from training.data.archives import DISK_ERRNOS, is_junk, unpack_archive
from training.data.dataset import IngestLimits
from training.data.ingest import work_folder
from training.errors import ArchiveError, ImageError, InvalidInput, NotFound, TrainingError
from training.images import DEFAULT_MAX_PIXELS, preprocess_image
from training.settings import Settings

if TYPE_CHECKING:  # training.predict imports Keras; this module does so only when a model is loaded
    from training.predict import Forward, LoadedModel

# A file source with one of these names is opened as an archive; anything else is read as an image.
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
CSV_COLUMNS = ("path", "label", "probability", "top_k", "error")
DEFAULT_BATCH_SIZE = 32
# Unreadable files named on stderr at the end of a run; the output file lists every one.
SHOWN_ERRORS = 20

FoundFn = Callable[[int], None]


def _ignore(count: int) -> None:
    """Take a count and do nothing (the default `found`)."""


@dataclass(frozen=True)
class Input:
    """One file to predict: its path as the output names it, and its bytes or why they could not be read."""

    path: str
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Row:
    """One output row: an image's top label, probability and top k, or why it could not be read."""

    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        """The row as JSON-ready `{"path", "label", "probability", "top_k", "error"}`."""
        return asdict(self)


# --- arguments ----------------------------------------------------------------------------------------------------


def check_output(path: str | Path) -> str:
    """Check an output file's name and folder before any work; return its format, "csv" or "jsonl"."""
    path = Path(path)
    kind = path.suffix.lower()[1:]
    if kind not in WRITERS:
        raise InvalidInput(f"--out must end in .csv or .jsonl, received: {str(path)!r}")
    if not path.parent.is_dir():
        raise NotFound(f"output folder does not exist: {path.parent}")
    return kind


def check_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Check that every source is an existing file or folder (before any work); return them as paths."""
    if not sources:
        raise InvalidInput("no sources given: name image files, folders or archives")
    paths = [Path(source) for source in sources]
    for path in paths:
        if not path.exists():
            raise NotFound(f"no such file or folder: {path}")
        if not (path.is_file() or path.is_dir()):  # a FIFO or device would block or never end
            raise InvalidInput(f"not a file or folder: {path}")
    return paths


# --- inputs -------------------------------------------------------------------------------------------------------


def iter_inputs(sources: Sequence[Path], work_dir: Path, limits: IngestLimits, max_bytes: int,
                found: FoundFn = _ignore) -> Iterator[Input]:
    """Yield every file of `sources` in order, read lazily; call `found` with each source's file count first.

    A folder is walked recursively in sorted order, an archive is unpacked safely under `work_dir`
    (the temporary folder is removed once its files are read, or when this generator is closed).
    """
    for source in sources:
        if source.is_dir():
            listing = _folder_files(source)
            found(len(listing))
            yield from (_read(path, str(path), max_bytes) if error is None else Input(str(path), error=error)
                        for path, error in listing)
        elif source.name.lower().endswith(ARCHIVE_SUFFIXES):
            yield from _archive_inputs(source, work_dir, limits, max_bytes, found)
        else:
            found(1)
            yield _read(source, str(source), max_bytes)


def _folder_files(root: Path) -> list[tuple[Path, str | None]]:
    """Every visible file under `root`, sorted by path, each with None or why its folder could not be listed.

    Hidden files and folders and OS litter are left out; links to folders are not followed, so a
    link loop cannot make the walk endless.
    """
    found: list[tuple[Path, str | None]] = []

    def unreadable(exc: OSError) -> None:
        found.append((Path(exc.filename), f"cannot read folder ({exc.strerror})"))

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = [name for name in dirs if not is_junk(name)]
        found.extend((Path(folder, name), None) for name in files if not is_junk(name))
    # By path parts, not by string: "a/b.png" sorts before "a-b/c.png", as Path and ingest sort them.
    return sorted(found, key=lambda entry: entry[0].relative_to(root).parts)


def _archive_inputs(archive: Path, work_dir: Path, limits: IngestLimits, max_bytes: int,
                    found: FoundFn) -> Iterator[Input]:
    """Yield an archive's files as `archive:member` inputs, and the entries it left out with their reasons."""
    with work_folder(work_dir, "predict-") as folder:
        dest = Path(folder)
        try:
            skipped = unpack_archive(archive, dest, limits, name=str(archive))
        except ArchiveError as exc:
            found(1)
            yield Input(str(archive), error=exc.message)
            return
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:  # the disk, not the archive: no other source would fare better
                raise TrainingError(f"cannot unpack {archive} under {dest.parent}: {exc.strerror}") from None
            raise
        entries = [(path.relative_to(dest).as_posix(), path) for path, _ in _folder_files(dest)]
        entries += [(entry.path, entry.reason) for entry in skipped]
        entries.sort(key=lambda entry: _member_parts(entry[0]))
        found(len(entries))
        for member, what in entries:
            shown = f"{archive}:{member}"
            yield _read(what, shown, max_bytes) if isinstance(what, Path) else Input(shown, error=what)


def _member_parts(member: str) -> tuple[str, ...]:
    """An archive member's path parts, for sorting members the way folders sort."""
    return tuple(part for part in member.replace("\\", "/").split("/") if part not in ("", "."))


def _read(path: Path, shown: str, max_bytes: int) -> Input:
    """Read one file's bytes, or say why not (too large: refused before reading, as the service does)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Input(shown, error=f"file too large ({size} bytes, over the limit of {max_bytes})")
        return Input(shown, data=path.read_bytes())
    except OSError as exc:
        return Input(shown, error=f"cannot read file ({exc.strerror})")


# --- scoring ------------------------------------------------------------------------------------------------------


def load_model(settings: Settings, name: str, version: int | None = None) -> tuple[LoadedModel, Forward | None]:
    """Load a stored version and the forward pass its pixels need (TensorFlow is imported here, not before)."""
    from training.predict import load_with_forward

    return load_with_forward(settings, name, version)


def predict_batches(model: LoadedModel, inputs: Iterable[Input], forward: Forward | None = None, top_k: int = 3,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[list[Row]]:
    """Yield the rows of `inputs` in order, one list per batch of `batch_size` inputs.

    The next batch is read and decoded (in a thread pool) while the model runs on this one, so at
    most two batches are in memory.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, received: {batch_size!r}")
    chunks = _chunks(iter(inputs), batch_size)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            ThreadPoolExecutor(max_workers=1) as prefetch:

        def load_next() -> tuple[list[Input], list[np.ndarray | str]] | None:
            # Only this one prefetch thread advances `inputs`, one batch at a time.
            chunk = next(chunks, None)
            if chunk is None:
                return None
            return chunk, list(pool.map(lambda item: _decode(item, model.image_size, max_pixels), chunk))

        pending = prefetch.submit(load_next)
        while (loaded := pending.result()) is not None:
            pending = prefetch.submit(load_next)
            yield _score(model, *loaded, forward, top_k)


def _chunks(items: Iterator[Input], size: int) -> Iterator[list[Input]]:
    """Split an iterator into lists of `size` (the last one shorter)."""
    while chunk := list(islice(items, size)):
        yield chunk


def _decode(item: Input, image_size: int, max_pixels: int) -> np.ndarray | str:
    """Preprocess one input's bytes for the model, or return why it cannot be."""
    if item.data is None:
        return item.error or "no data"
    try:
        return preprocess_image(item.data, image_size, max_pixels)
    except ImageError as exc:
        return exc.message


def _score(model: LoadedModel, chunk: list[Input], decoded: list[np.ndarray | str], forward: Forward | None,
           top_k: int) -> list[Row]:
    """Score a batch's readable images in one forward pass; return its rows in input order."""
    from training.predict import top_k_labels

    pixels = [item for item in decoded if not isinstance(item, str)]
    answers = iter(top_k_labels(model.probabilities(np.stack(pixels), forward=forward), model.classes, top_k)
                   if pixels else [])
    rows = []
    for item, outcome in zip(chunk, decoded):
        if isinstance(outcome, str):
            rows.append(Row(item.path, error=outcome))
        else:
            answer = next(answers)
            rows.append(Row(item.path, answer["label"], answer["probability"], answer["top_k"]))
    return rows


def predict_sources(settings: Settings, model: LoadedModel, forward: Forward | None, sources: Sequence[Path],
                    top_k: int = 3, batch_size: int = DEFAULT_BATCH_SIZE,
                    found: FoundFn = _ignore) -> Iterator[list[Row]]:
    """Yield the rows of every file in `sources`, one list per batch, in input order; close it to stop early."""
    limits = IngestLimits.from_settings(settings)
    # MAX_PREDICT_MB: a file larger than the service would take for one image is refused unread.
    inputs = iter_inputs(sources, settings.data_dir, limits, settings.max_predict_mb * 2**20, found)
    # Closed in this order: the batches (which waits for the prefetch thread), then the inputs (and their
    # temporary folders), so a generator is never closed while another thread runs it.
    with closing(inputs), closing(predict_batches(model, inputs, forward, top_k, batch_size,
                                                  settings.max_image_pixels)) as batches:
        yield from batches


# --- outputs ------------------------------------------------------------------------------------------------------


class CsvRows:
    """Rows as CSV with a header: top_k as a JSON list, empty fields where there is no value."""

    def __init__(self, file: IO[str]) -> None:
        self.writer = csv.writer(file)
        self.writer.writerow(CSV_COLUMNS)

    def write(self, rows: Iterable[Row]) -> None:
        """Write rows (floats as Python writes them: the shortest text that reads back the same number)."""
        self.writer.writerows((row.path, row.label, row.probability,
                               json.dumps(row.top_k) if row.top_k else None, row.error) for row in rows)


class JsonlRows:
    """Rows as JSON Lines: one `{"path", "label", "probability", "top_k", "error"}` object a line."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def write(self, rows: Iterable[Row]) -> None:
        """Write rows, one JSON object per line."""
        self.file.writelines(json.dumps(row.as_dict(), ensure_ascii=False) + "\n" for row in rows)


WRITERS = {"csv": CsvRows, "jsonl": JsonlRows}


@contextmanager
def open_results(path: str | Path) -> Iterator[Callable[[Iterable[Row]], None]]:
    """Yield a function that writes rows to `path` (CSV or JSONL by its suffix), flushed at each call.

    Rows go to a temporary file beside `path` that is renamed into place only when the block ends
    without an error, so a crash never leaves a half file under the final name.
    """
    path = Path(path)
    writer_class = WRITERS[check_output(path)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 is for secrets; results are an ordinary file
        # backslashreplace: a file name that is not valid UTF-8 is still written, escaped.
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", newline="") as file:
            writer = writer_class(file)

            def write(rows: Iterable[Row]) -> None:
                writer.write(rows)
                file.flush()

            yield write
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- summary ------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """How many images a run predicted and could not read, with the first `SHOWN_ERRORS` unreadable rows."""

    predicted: int = 0
    unreadable: int = 0
    errors: list[Row] = field(default_factory=list)

    def add(self, rows: Iterable[Row]) -> None:
        """Count a batch of rows."""
        for row in rows:
            if row.error is None:
                self.predicted += 1
                continue
            self.unreadable += 1
            if len(self.errors) < SHOWN_ERRORS:
                self.errors.append(row)

    def check(self) -> None:
        """Raise when no image at all was predicted, naming the first unreadable file's reason."""
        if self.predicted:
            return
        if not self.unreadable:
            raise InvalidInput("no files to predict: the sources hold no visible files")
        first = self.errors[0]
        if self.unreadable == 1:
            raise ImageError(f"no image could be read: {first.path}: {first.error}")
        raise ImageError(f"no image could be read: all {self.unreadable} files failed, "
                         f"the first {first.path}: {first.error}")
