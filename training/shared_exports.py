"""Exports shared through the object store: a worker on any host builds one, every API replica streams it.

`SharedExportStore` (STORE_URL set: `ExportStore.from_settings` opens it) keeps the local layout of
`ExportStore` as this host's copy and adds the store: a worker puts the finished archive at
`exports/<name>/<version>/FORMAT.tar.gz` (one object, so whole or absent) and a failure's message at
`FORMAT.error`; an API replica that has no local archive downloads it from there once. The build lock
and the request marker stay per host: a replica cannot see another host's lock, so it says `queued`
while a remote worker builds, and `ready` once the archive is in the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from training.exports import RETRY_AFTER_FAILURE_S, ExportStore
from training.objectstore import Objects
from training.settings import Settings
from training.store import ModelStore, validate_name


class SharedExportStore(ExportStore):
    """Exports under `root` on this host, and in the object store for every other."""

    def __init__(self, root: str | Path, models: ModelStore, objects: Objects) -> None:
        super().__init__(root, models)
        self.objects = objects

    @classmethod
    def open(cls, settings: Settings) -> SharedExportStore:
        """The shared export store of STORE_URL, with this host's copies under DATA_DIR/exports."""
        models = ModelStore.from_settings(settings)
        return cls(settings.data_dir / "exports", models, models.objects)

    def _key(self, name: str, version: int, fmt: str, suffix: str) -> str:
        return f"exports/{self._file(name, version, fmt, suffix).relative_to(self.root).as_posix()}"

    def archive(self, name: str, version: int, fmt: str) -> Path | None:
        """The finished archive: this host's copy, else downloaded from the store once; None if neither has it."""
        path = super().archive(name, version, fmt)
        if path is not None:
            return path
        path = self._file(name, version, fmt, "tar.gz")
        return path if self.objects.get_file(self._key(name, version, fmt, "tar.gz"), path) else None

    def state(self, name: str, version: int, fmt: str) -> dict:
        """As `ExportStore.state`, with a failure recorded by a worker on another host."""
        found = super().state(name, version, fmt)
        if found["status"] in ("ready", "failed", "running"):
            return found
        data = self.objects.get_bytes(self._key(name, version, fmt, "error"))
        failure = json.loads(data) if data else None
        if failure and time.time() - failure["at"] < RETRY_AFTER_FAILURE_S:
            return {"status": "failed", "error": failure["error"]}
        return found

    def request(self, name: str, version: int, fmt: str) -> None:
        """Record the request here and clear a failure recorded in the store."""
        super().request(name, version, fmt)
        self.objects.delete_prefix(self._key(name, version, fmt, "error"))

    def _make(self, settings: Settings, name: str, version: int, fmt: str) -> Path:
        """Build the archive here, then put it in the store for the API replicas."""
        archive = super()._make(settings, name, version, fmt)
        self.objects.put_file(self._key(name, version, fmt, "tar.gz"), archive)
        return archive

    def _write(self, path: Path, record: dict) -> None:
        """Write a request or failure record here; a failure goes to the store too."""
        ExportStore._write(path, record)
        if path.name.endswith(".error"):
            self.objects.put_bytes(f"exports/{path.relative_to(self.root).as_posix()}", json.dumps(record).encode())

    def discard(self, name: str, version: int) -> None:
        """Remove a version's exports here and in the store."""
        super().discard(name, version)
        self.objects.delete_prefix(f"exports/{validate_name(name)}/{int(version)}/")
