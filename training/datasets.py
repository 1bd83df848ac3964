"""The dataset store: uploaded dataset archives, validated once and kept by content.

Layout: `<root>/<id>/archive` holds the uploaded bytes, `<root>/<id>/data/` the
unpacked, validated tree (what `training.pipeline.train(source=...)` takes) and
`<root>/<id>/report.json` the ingest report plus `sha256`, `size` and `created`.
The id is the first 16 hex characters of the archive's sha256, so uploading the
same bytes twice finds the dataset already there instead of unpacking it again.

A dataset is written into a hidden staging folder inside the root and renamed
into place, so a crash never leaves a half dataset visible and a failed upload
leaves nothing behind. Hidden names (`.staging-*`, `.deleting-*`) never match the
id pattern, so readers never see them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from training.errors import ArchiveError, DatasetNotFoundError, InvalidInput
from training.ingest import CHUNK_BYTES, IngestLimits, ingest
from training.store import fsync_dir, fsync_tree

if TYPE_CHECKING:
    from training.settings import Settings

ID_PATTERN = re.compile(r"[0-9a-f]{16}")


def validate_id(dataset_id: str) -> str:
    """Check a dataset id: exactly 16 lowercase hex characters, so it can never name a path outside the root."""
    if not isinstance(dataset_id, str) or not ID_PATTERN.fullmatch(dataset_id):
        raise InvalidInput(f"dataset_id must be 16 lowercase hex characters, received: {dataset_id!r}")
    return dataset_id


def display_name(filename: str | None) -> str:
    """A safe file name for an upload, from the name its client gave it ("archive" when none is usable)."""
    name = re.sub(r"[^\w.\- ]", "_", Path(filename or "").name).strip(" .")[:100]
    return name or "archive"


class DatasetStore:
    """Validated datasets under one root folder (`DATA_DIR/datasets`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetStore:
        """Open the store at the settings' datasets folder."""
        return cls(settings.datasets_dir)

    def add_archive(self, stream: BinaryIO, limits: IngestLimits, max_bytes: int, filename: str | None = None) -> dict:
        """Store an uploaded archive once validated; return its record, with `existing` telling if it was known.

        Raises ArchiveError for an upload over `max_bytes` or an invalid archive and
        DatasetError for a dataset that cannot be trained on; nothing is left behind.
        `filename`, the name the client gave the upload, is only used to name it in error messages.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        (staging / "upload").mkdir(parents=True)
        upload = staging / "upload" / display_name(filename)
        try:
            digest, size = _save_stream(stream, upload, max_bytes)
            dataset_id = digest[:16]
            if (self.root / dataset_id).is_dir():
                return self._existing(dataset_id)
            dataset = ingest(upload, workdir=staging / "data", limits=limits)
            upload.rename(staging / "archive")
            (staging / "upload").rmdir()
            report = dataset.report()
            # The ingest id hashes the labeled images, not the bytes: kept, since two packings of one
            # dataset share it.
            record = {**report, "content_id": report["id"], "id": dataset_id, "sha256": digest, "size": size,
                      "created": datetime.now(UTC).isoformat(timespec="microseconds")}
            _write_json(staging / "report.json", record)
            fsync_tree(staging)
            if not self._rename_into_place(staging, dataset_id):
                return self._existing(dataset_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place
        return {**record, "existing": False}

    def get(self, dataset_id: str) -> dict:
        """Return a dataset's record (its report.json with its id)."""
        try:
            text = (self.root / validate_id(dataset_id) / "report.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}") from None
        return {**json.loads(text), "id": dataset_id}

    def path(self, dataset_id: str) -> Path:
        """Return the folder of a dataset's unpacked, validated images."""
        folder = self.root / validate_id(dataset_id) / "data"
        if not folder.is_dir():
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}")
        return folder

    def list(self) -> list[dict]:
        """Return every dataset's record, newest first."""
        if not self.root.is_dir():
            return []
        records = []
        for entry in self.root.iterdir():
            if not ID_PATTERN.fullmatch(entry.name):
                continue
            try:
                records.append(self.get(entry.name))
            except DatasetNotFoundError:
                continue  # deleted while listing
        return sorted(records, key=lambda r: (r.get("created", ""), r["id"]), reverse=True)

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset: it disappears atomically, its files go after."""
        folder = self.root / validate_id(dataset_id)
        trash = self.root / f".deleting-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}") from None
        shutil.rmtree(trash, ignore_errors=True)

    def _existing(self, dataset_id: str) -> dict:
        return {**self.get(dataset_id), "existing": True}

    def _rename_into_place(self, staging: Path, dataset_id: str) -> bool:
        """Rename staging to the dataset folder; False when a concurrent upload of the same bytes got there first."""
        try:
            os.rename(staging, self.root / dataset_id)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        fsync_dir(self.root)
        return True


def _save_stream(stream: BinaryIO, target: Path, max_bytes: int) -> tuple[str, int]:
    """Copy an upload to `target` in chunks, hashing as it goes; return (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as file:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            # Checked per chunk, so an endless upload costs at most one chunk over the limit.
            if size > max_bytes:
                raise ArchiveError(f"upload is larger than {max_bytes / 2**20:g} MB")
            digest.update(chunk)
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest(), size


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


