"""The dataset store on storage every host shares: the API uploads, an ingest worker on any host reads.

`SharedDatasetStore` (STORE_URL set: `DatasetStore.from_settings` opens it) keeps each dataset in
the object store under `datasets/<id>/`: `archive` (the uploaded bytes), `ingested.tar` (the unpacked,
checked tree and its manifest, once ingested) and `record.json`, written last, which makes a dataset
visible and is what every host reads for its status. An upload is streamed, hashed and sniffed in the
web process as before, then put in the store; an ingest downloads the archive into this host's
`DATA_DIR/datasets` and runs the local store's ingest there (its lock makes it once per host), then
puts the ingested tree before the `ready` record. A training worker downloads the ingested tree once.

Across hosts nothing locks: two hosts may ingest one dataset at once (a redelivered message), which
costs a worker but no harm, since both derive the same tree from the same bytes. A dataset left
`ingesting` for INGEST_STALE_SECONDS (its worker died) is queued again by the reconciler.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from training.data.dataset import Dataset, IngestLimits, read_manifest
from training.data.store import (
    ARCHIVE,
    FAILED,
    FINAL_STATUSES,
    ID_PATTERN,
    INGESTED,
    INGESTING,
    MANIFEST,
    QUEUED,
    READY,
    RECORD,
    DatasetStore,
    now,
    received_archive,
    validate_id,
)
from training.errors import DatasetError, DatasetNotFoundError
from training.objectstore import Objects
from training.settings import Settings
from training.store import fsync_dir

INGESTED_TAR = "ingested.tar"
# An ingest still `ingesting` after this long lost its worker: queued again (a duplicate is harmless).
INGEST_STALE_SECONDS = 3600


class SharedDatasetStore(DatasetStore):
    """Datasets in the object store; this host's working copies under `root` (`DATA_DIR/datasets`)."""

    def __init__(self, root: str | Path, objects: Objects, limits: IngestLimits = IngestLimits()) -> None:
        super().__init__(root, limits)
        self.objects = objects

    @classmethod
    def open(cls, settings: Settings) -> SharedDatasetStore:
        """The shared store of STORE_URL, with this host's copies under the settings' datasets folder."""
        from training.shared_store import SharedModelStore

        objects = SharedModelStore.open(settings).objects  # one client per process and store
        return cls(settings.datasets_dir, objects, IngestLimits.from_settings(settings))

    # --- objects --------------------------------------------------------------------------------------------------

    @staticmethod
    def _key(dataset_id: str, name: str = "") -> str:
        return f"datasets/{dataset_id}/{name}"

    def _remote(self, dataset_id: str) -> dict | None:
        """A dataset's record in the store, or None."""
        data = self.objects.get_bytes(self._key(validate_id(dataset_id), RECORD))
        return None if data is None else json.loads(data)

    def _put_record(self, record: dict) -> dict:
        """Write a dataset's record to the store (one object: readers see the old or the new one); return it."""
        record = {key: value for key, value in record.items() if key != "existing"}
        self.objects.put_bytes(self._key(record["id"], RECORD), json.dumps(record, indent=2).encode())
        return record

    # --- upload (the web process) -----------------------------------------------------------------------------------

    def add_archive(self, stream: BinaryIO, max_bytes: int, filename: str | None = None) -> dict:
        """Store an uploaded archive in the object store, queued for ingest; return its record and `existing`."""
        with received_archive(self.root, stream, max_bytes, filename) as (staging, record):
            dataset_id = record["id"]
            remote = self._remote(dataset_id)
            if remote is None:
                self.objects.put_file(self._key(dataset_id, ARCHIVE), staging / ARCHIVE)  # the bytes, then the record
                return {**self._put_record(record), "existing": False}
            if remote["status"] == FAILED and self.objects.list(self._key(dataset_id, ARCHIVE)):
                # Failed for a reason other than its bytes (those are removed): uploading it again retries.
                remote = self._put_record({**remote, "status": QUEUED, "error": None, "attempts": 0})
            return {**remote, "existing": True}

    # --- reading ------------------------------------------------------------------------------------------------------

    def get(self, dataset_id: str) -> dict:
        """Return a dataset's record from the store."""
        record = self._remote(dataset_id)
        if record is None:
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}")
        return record

    def list(self) -> list[dict]:
        """Return every dataset's record, newest first."""
        ids = {key.split("/")[1] for key in self.objects.list("datasets/")
               if key.endswith(f"/{RECORD}") and ID_PATTERN.fullmatch(key.split("/")[1])}
        records = [record for dataset_id in ids if (record := self._remote(dataset_id)) is not None]
        return sorted(records, key=lambda r: (r.get("created") or "", r["id"]), reverse=True)

    def dataset(self, dataset_id: str) -> Dataset:
        """The ingested dataset, from this host's copy of its ingested tree (downloaded once)."""
        status = self.trainable(dataset_id)["status"]
        if status != READY:
            raise DatasetError(f"dataset {dataset_id} is not ingested yet (status {status})")
        folder = self.root / dataset_id / INGESTED
        if not (folder / MANIFEST).is_file():
            self._pull_ingested(dataset_id)
        return read_manifest(folder / MANIFEST, folder / "data")

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset: its record first (it disappears at once), then its objects and this host's copy."""
        self.get(dataset_id)
        self.objects.delete_prefix(self._key(dataset_id, RECORD))
        self.objects.delete_prefix(self._key(dataset_id))
        folder = self.root / dataset_id
        if folder.is_dir():
            trash = self.root / f".deleting-{uuid.uuid4().hex}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # --- ingest (a worker on any host) --------------------------------------------------------------------------------

    def ingest(self, dataset_id: str) -> dict:
        """Ingest a stored archive on this host, once per host, and return the final record (`ready` or `failed`)."""
        record = self.get(dataset_id)
        if record["status"] in FINAL_STATUSES:
            return record
        if not self._pull_archive(dataset_id, record):
            return self._put_record({**record, "status": FAILED, "finished": now(),
                                     "error": f"its archive is missing from {self.objects.url}; upload it again"})
        return super().ingest(dataset_id)

    def _pull_archive(self, dataset_id: str, record: dict) -> bool:
        """Give this host a working copy of the archive and the store's record; False when the archive is gone."""
        folder = self.root / dataset_id
        if not (folder / ARCHIVE).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging-{uuid.uuid4().hex}"
            try:
                if not self.objects.get_file(self._key(dataset_id, ARCHIVE), staging / ARCHIVE):
                    return False
                folder.mkdir(exist_ok=True)
                os.replace(staging / ARCHIVE, folder / ARCHIVE)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        with self._lock(folder, wait=True):
            # The store's record rules: a local one left final by an earlier try is replaced.
            DatasetStore._write(folder, record)
        return True

    def _write(self, folder: Path, record: dict) -> dict:
        """Replace a dataset's record here and in the store; a `ready` one only once its ingested tree is up."""
        DatasetStore._write(folder, record)
        if record["status"] == READY:
            self._push_ingested(folder)
        elif record["status"] == FAILED and not (folder / ARCHIVE).is_file():
            self.objects.delete_prefix(self._key(folder.name, ARCHIVE))  # its bytes are at fault: not kept
        return self._put_record(record)

    def _push_ingested(self, folder: Path) -> None:
        """Put the ingested tree (images and manifest) in the store as one tar object."""
        tmp = folder / f".staging-{uuid.uuid4().hex}.tar"
        try:
            with tarfile.open(tmp, "w") as archive:
                archive.add(folder / INGESTED, arcname=INGESTED)
            self.objects.put_file(self._key(folder.name, INGESTED_TAR), tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _pull_ingested(self, dataset_id: str) -> None:
        """Download and unpack a ready dataset's ingested tree into this host's copy."""
        folder = self.root / dataset_id
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".staging-{uuid.uuid4().hex}"
        try:
            if not self.objects.get_file(self._key(dataset_id, INGESTED_TAR), staging / INGESTED_TAR):
                raise DatasetError(f"dataset {dataset_id} is ready but its ingested files are missing from "
                                   f"{self.objects.url}; upload it again")
            with tarfile.open(staging / INGESTED_TAR) as archive:
                archive.extractall(staging, filter="data")  # our own tar, still unpacked as untrusted
            try:
                os.rename(staging / INGESTED, folder / INGESTED)
            except OSError:
                if not (folder / INGESTED / MANIFEST).is_file():
                    raise  # else another process of this host unpacked it first
            fsync_dir(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --- reconciling (the reconciler) ---------------------------------------------------------------------------------

    def requeue_abandoned(self) -> list[str]:
        """Queue again the datasets left `ingesting` longer than INGEST_STALE_SECONDS (no lock spans hosts)."""
        cutoff = (datetime.now(UTC) - timedelta(seconds=INGEST_STALE_SECONDS)).isoformat(timespec="microseconds")
        requeued = []
        for record in self.list():
            if record["status"] == INGESTING and (record.get("started") or "") < cutoff:
                self._put_record({**record, "status": QUEUED})
                requeued.append(record["id"])
        return requeued
