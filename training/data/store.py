"""The dataset store: uploaded archives kept by content, each ingested once, off the web process.

Layout of `<root>/<id>/` (the id is the first 16 hex characters of the archive's sha256, so the
same bytes uploaded twice find the dataset already there):
- `archive`: the uploaded bytes;
- `record.json`: what the API shows: `sha256`, `size`, `filename`, `created` and `status`
  (`queued` → `ingesting` → `ready` | `failed`), then the ingest report once `ready`, or the
  `error` once `failed`;
- `ingested/data/`: the unpacked, checked tree, and `ingested/manifest.json`: every usable image
  (relative path, label, split, sha256, size) and what was left out. Training reads these
  instead of decoding and hashing every image again;
- `.lock`: held (flock) by whoever ingests the dataset, for the whole ingest.

Uploading only streams, hashes and checks that the bytes start like an archive (`add_archive`,
in the web process); `ingest` does the rest, in the ingest worker or in the training job that
needs the dataset first. The lock makes it run once however often it is asked for (a redelivered
message, a second worker, a job): a second caller waits and finds the dataset ready. A process
that dies while ingesting releases the lock with it, so a dataset left `ingesting` with its lock
free was abandoned; `requeue_abandoned` (the reconciler) puts it back in the queue.

Everything appears whole or not at all: an upload is written into a hidden staging folder in the
root and renamed into place; an ingest unpacks into a hidden staging folder inside the dataset's
folder, renamed to `ingested/` once complete; `record.json` is replaced atomically. Hidden names
(`.staging-*`, `.deleting-*`) never match the id pattern, so readers never see them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from training.data.archives import CHUNK_BYTES, archive_kind
from training.data.dataset import Dataset, IngestLimits, read_manifest, write_manifest
from training.data.ingest import ingest
from training.errors import ArchiveError, DatasetError, DatasetNotFoundError, InvalidInput, TrainingError
from training.store import disk_full_as_error, file_lock, fsync_dir, fsync_tree, write_json_atomic

if TYPE_CHECKING:
    from training.settings import Settings

QUEUED, INGESTING, READY, FAILED = "queued", "ingesting", "ready", "failed"
STATUSES = (QUEUED, INGESTING, READY, FAILED)
FINAL_STATUSES = (READY, FAILED)
ID_PATTERN = re.compile(r"[0-9a-f]{16}")
# An ingest whose process died this many times (out of memory, say) fails instead of being tried forever.
MAX_ATTEMPTS = 3
ARCHIVE, RECORD, INGESTED, MANIFEST, LOCK = "archive", "record.json", "ingested", "manifest.json", ".lock"
# Written by versions that ingested inside the upload request: such a dataset is ingested again, once.
LEGACY_REPORT, LEGACY_DATA = "report.json", "data"

log = logging.getLogger(__name__)


def validate_id(dataset_id: str) -> str:
    """Check a dataset id: exactly 16 lowercase hex characters, so it can never name a path outside the root."""
    if not isinstance(dataset_id, str) or not ID_PATTERN.fullmatch(dataset_id):
        raise InvalidInput(f"dataset_id must be 16 lowercase hex characters, received: {dataset_id!r}")
    return dataset_id


def display_name(filename: str | None) -> str:
    """A safe file name for an upload, from the name its client gave it ("archive" when none is usable)."""
    name = re.sub(r"[^\w.\- ]", "_", Path(filename or "").name).strip(" .")[:100]
    return name or "archive"


def now() -> str:
    """The current time as the records write it (ISO 8601, UTC)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class DatasetStore:
    """Uploaded datasets under one root folder (`DATA_DIR/datasets`), ingested with `limits`."""

    def __init__(self, root: str | Path, limits: IngestLimits = IngestLimits()) -> None:
        self.root = Path(root)
        self.limits = limits

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetStore:
        """Open the store at the settings' datasets folder, with their ingest limits (the shared one with STORE_URL)."""
        if settings.shared:
            from training.data.shared_store import SharedDatasetStore  # boto3 only when shared

            return SharedDatasetStore.open(settings)
        return cls(settings.datasets_dir, IngestLimits.from_settings(settings))

    # --- upload (the web process) ------------------------------------------------------------------------------------

    def add_archive(self, stream: BinaryIO, max_bytes: int, filename: str | None = None) -> dict:
        """Store an uploaded archive, queued for ingest; return its record, with `existing` telling if it was known.

        Decodes no image: it streams the bytes to disk, hashes them and checks that they start like
        a .zip or .tar.gz. Raises ArchiveError for an upload over `max_bytes` or one that is not an
        archive, and then leaves nothing behind. `filename`, the name the client gave the upload,
        names it in messages.
        """
        with received_archive(self.root, stream, max_bytes, filename) as (staging, record):
            dataset_id = record["id"]
            if not (self.root / dataset_id).is_dir():
                _write_json(staging / RECORD, record)
                fsync_tree(staging)
                if self._rename_into_place(staging, dataset_id):
                    return {**self.get(dataset_id), "existing": False}
            return {**self._retry_failed(dataset_id), "existing": True}

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

    def _retry_failed(self, dataset_id: str) -> dict:
        """Queue a dataset again whose ingest failed for a reason other than its bytes; return its record.

        Such a failure (a full disk, a crash) keeps the archive; one caused by the bytes removes it,
        since the same bytes would fail the same way.
        """
        folder = self.root / dataset_id
        with self._lock(folder, wait=False) as locked:
            record = self.get(dataset_id)
            if locked and record["status"] == FAILED and (folder / ARCHIVE).is_file():
                log.info("dataset %s uploaded again after a failed ingest (%s): queued again", dataset_id,
                         record["error"])
                record = self._write(folder, {**record, "status": QUEUED, "error": None, "attempts": 0})
        return record

    # --- reading ------------------------------------------------------------------------------------------------------

    def get(self, dataset_id: str) -> dict:
        """Return a dataset's record: its status, and its report once ready or its error once failed."""
        return self._read(self._folder(dataset_id))

    def trainable(self, dataset_id: str) -> dict:
        """Return a dataset's record; DatasetError (a 400) when its ingest failed."""
        record = self.get(dataset_id)
        if record["status"] == FAILED:
            raise DatasetError(f"dataset {dataset_id} cannot be trained on: {record['error']}")
        return record

    def dataset(self, dataset_id: str) -> Dataset:
        """The ingested dataset, read from its manifest: items point into `ingested/data/`, nothing is decoded."""
        status = self.trainable(dataset_id)["status"]
        if status != READY:
            raise DatasetError(f"dataset {dataset_id} is not ingested yet (status {status})")
        folder = self.root / dataset_id / INGESTED
        return read_manifest(folder / MANIFEST, folder / "data")

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
        return sorted(records, key=lambda r: (r.get("created") or "", r["id"]), reverse=True)

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset: it disappears atomically, its files go after."""
        folder = self.root / validate_id(dataset_id)
        trash = self.root / f".deleting-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}") from None
        shutil.rmtree(trash, ignore_errors=True)

    # --- ingest (a worker) --------------------------------------------------------------------------------------------

    def ingest(self, dataset_id: str) -> dict:
        """Ingest a stored archive once and return the dataset's final record (`ready` or `failed`).

        Waits while another process ingests it, then returns what that one recorded; a dataset
        already ready or failed is returned as it is. Never raises for a bad archive or dataset:
        that is a `failed` record whose `error` says why.
        """
        folder = self._folder(dataset_id)
        with self._lock(folder, wait=True):
            record = self._read(folder)
            if record["status"] in FINAL_STATUSES:
                return record
            # Leftovers of an ingest whose process died: nobody else works here while we hold the lock.
            for leftover in folder.glob(".staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if not (folder / INGESTED).is_dir():  # else a crash came between its rename and the record
                attempts = record.get("attempts", 0) + 1
                if attempts > MAX_ATTEMPTS:
                    error = (f"its ingest was started {MAX_ATTEMPTS} times and its process died each time (out of "
                             "memory?); check the ingest worker's log")
                else:
                    record = self._write(folder, {**record, "status": INGESTING, "error": None, "started": now(),
                                                  "attempts": attempts})
                    error = self._unpack(folder, record)
                if error is not None:
                    return self._write(folder, {**record, "status": FAILED, "error": error, "finished": now()})
            return self._finish(folder, record)

    def _unpack(self, folder: Path, record: dict) -> str | None:
        """Unpack, check and write the manifest into `ingested/`; return why it failed, or None."""
        staging = folder / f".staging-{uuid.uuid4().hex}"
        try:
            with disk_full_as_error(f"could not unpack dataset {folder.name} in {self.root}"):
                dataset = ingest(folder / ARCHIVE, staging / "data", self.limits, record.get("filename"))
                write_manifest(dataset, staging / MANIFEST)
                fsync_tree(staging)
                os.rename(staging, folder / INGESTED)
                fsync_dir(folder)
        except InvalidInput as exc:
            # The bytes themselves are at fault: they will never make a dataset, so they need not be kept.
            (folder / ARCHIVE).unlink(missing_ok=True)
            return exc.message
        except TrainingError as exc:  # a full disk: the archive stays, and uploading it again retries
            return exc.message
        except Exception as exc:
            # Recorded, not raised: an archive that crashes ingest every time must not be re-sent forever.
            log.error("ingest of dataset %s crashed:\n%s", folder.name, traceback.format_exc())
            return f"internal error while ingesting: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place
        return None

    def _finish(self, folder: Path, record: dict) -> dict:
        """Record a dataset whose `ingested/` folder is complete as ready, with the report of its manifest."""
        report = read_manifest(folder / INGESTED / MANIFEST, folder / INGESTED / "data").report()
        # The ingest id hashes the labeled images, not the bytes: kept, since two packings of one dataset share it.
        ready = {**record, **report, "content_id": report["id"], "id": record["id"], "status": READY, "error": None,
                 "finished": now()}
        record = self._write(folder, ready)
        (folder / LEGACY_REPORT).unlink(missing_ok=True)
        shutil.rmtree(folder / LEGACY_DATA, ignore_errors=True)
        return record

    # --- reconciling (the reconciler) ---------------------------------------------------------------------------------

    def queued(self) -> list[dict]:
        """The records of the datasets waiting for ingest, oldest first."""
        return [r for r in reversed(self.list()) if r["status"] == QUEUED]

    def requeue_abandoned(self) -> list[str]:
        """Put back in the queue the datasets left `ingesting` by a process that died; return their ids."""
        requeued = []
        for record in self.list():
            if record["status"] != INGESTING:
                continue
            folder = self.root / record["id"]
            # Whoever ingests holds the lock throughout: a free lock and an `ingesting` record mean it died.
            with self._lock(folder, wait=False) as locked:
                if locked and self._read(folder)["status"] == INGESTING:
                    self._write(folder, {**record, "status": QUEUED})
                    requeued.append(record["id"])
        return requeued

    # --- files --------------------------------------------------------------------------------------------------------

    def _folder(self, dataset_id: str) -> Path:
        """The folder of an existing dataset; DatasetNotFoundError when there is none."""
        folder = self.root / validate_id(dataset_id)
        if not folder.is_dir():
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}")
        return folder

    def _read(self, folder: Path) -> dict:
        """A dataset's record as stored; one from before ingest workers is a queued record of its archive."""
        try:
            return json.loads((folder / RECORD).read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        try:
            legacy = json.loads((folder / LEGACY_REPORT).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no dataset with id {folder.name!r}") from None
        return {"id": folder.name, "status": QUEUED, "error": None, "sha256": legacy.get("sha256"),
                "size": legacy.get("size"), "filename": None, "created": legacy.get("created")}

    @staticmethod
    def _write(folder: Path, record: dict) -> dict:
        """Replace a dataset's record atomically (callers hold its lock); return it."""
        write_json_atomic(folder / RECORD, record)
        return record

    @staticmethod
    def _lock(folder: Path, wait: bool) -> contextlib.AbstractContextManager[bool]:
        """Hold the dataset's ingest lock across processes; yield False at once when `wait` is off and it is taken."""
        return file_lock(folder / LOCK, wait)


@contextlib.contextmanager
def received_archive(root: Path, stream: BinaryIO, max_bytes: int, filename: str | None):
    """Stream an upload into a staging folder under `root` and check it is an archive.

    Yields the folder (holding ARCHIVE) and the dataset's new record, named by the archive's hash;
    the folder is removed afterwards unless it was renamed away.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    name = display_name(filename)
    try:
        digest, size = _save_stream(stream, staging / ARCHIVE, max_bytes)
        archive_kind(staging / ARCHIVE, name)
        yield staging, {"id": digest[:16], "status": QUEUED, "error": None, "attempts": 0,
                        "sha256": digest, "size": size, "filename": name, "created": now()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place


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
