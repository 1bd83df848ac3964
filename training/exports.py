"""Exported archives of model versions: made once, by a worker, kept under DATA_DIR/exports, streamed by the API.

An export takes seconds to a minute (VGG19 converted to ONNX or TFLite), too long for a web request,
so `GET .../export` asks for it (`request`), a training worker makes it (`build`), and the next GET
streams the finished archive. Per version and format the folder holds:

- `FORMAT.tar.gz`: the archive, renamed into place whole (a reader never sees half of one);
- `FORMAT.requested`: when it was asked for (so a burst of GETs sends one message, and a lost one is re-sent);
- `FORMAT.error`: why the last try failed (a GET after `RETRY_AFTER_FAILURE_S` tries again);
- `FORMAT.lock`: held by the worker while it builds.
Version numbers are never reused, so an archive stays valid until its version is deleted (`discard`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from training.errors import InvalidInput, TrainingError
from training.settings import Settings
from training.store import ModelStore, file_lock, fsync_dir, validate_name, write_json_atomic

FORMATS = ("savedmodel", "onnx", "tflite", "keras")
# A request whose message was lost (the broker restarted, the worker died) is sent again after this long.
RESEND_AFTER_S = 15 * 60
RETRY_AFTER_FAILURE_S = 5 * 60
logger = logging.getLogger(__name__)


def check_format(fmt: str) -> str:
    """Return `fmt` if it is an export format, else raise InvalidInput naming it."""
    if fmt not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, received: {fmt!r}")
    return fmt


def archive_name(name: str, version: int, fmt: str) -> str:
    """The file name a downloaded export is saved under."""
    return f"{name}-v{version}-{fmt}.tar.gz"


def write_archive(folder: Path, archive: Path) -> None:
    """Pack `folder`'s contents into the .tar.gz `archive`, atomically (a partial file never has the final name)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=archive.parent, prefix=f".{archive.name}.", delete=False) as handle:
        partial = Path(handle.name)
        try:
            # Weights barely compress: a light level saves most of what gzip can at a fraction of the time.
            with tarfile.open(fileobj=handle, mode="w:gz", compresslevel=3) as tar:
                for path in sorted(folder.iterdir()):
                    tar.add(path, arcname=path.name)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, archive)
    fsync_dir(archive.parent)


class ExportStore:
    """The exports of a model store's versions, under one folder."""

    def __init__(self, root: str | Path, models: ModelStore) -> None:
        self.root, self.models = Path(root), models

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportStore:
        """The export store under DATA_DIR/exports, for MODEL_DIR's versions (shared through STORE_URL when set)."""
        if settings.shared:
            from training.shared_exports import SharedExportStore  # boto3 only when shared

            return SharedExportStore.open(settings)
        return cls(settings.data_dir / "exports", ModelStore.from_settings(settings))

    def _file(self, name: str, version: int, fmt: str, suffix: str) -> Path:
        return self.root / validate_name(name) / str(int(version)) / f"{check_format(fmt)}.{suffix}"

    def archive(self, name: str, version: int, fmt: str) -> Path | None:
        """The finished archive of an existing version, or None (NotFound if the version does not exist)."""
        self.models.resolve_version(name, version)
        path = self._file(name, version, fmt, "tar.gz")
        return path if path.is_file() else None

    def state(self, name: str, version: int, fmt: str) -> dict:
        """`{"status": ready|running|queued|failed|missing, "error"}` of a version's export."""
        if self.archive(name, version, fmt) is not None:
            return {"status": "ready", "error": None}
        if self._building(name, version, fmt):
            return {"status": "running", "error": None}
        failure = self._read(self._file(name, version, fmt, "error"))
        if failure and time.time() - failure["at"] < RETRY_AFTER_FAILURE_S:
            return {"status": "failed", "error": failure["error"]}
        requested = self._read(self._file(name, version, fmt, "requested"))
        if requested and time.time() - requested["at"] < RESEND_AFTER_S:
            return {"status": "queued", "error": None}
        return {"status": "missing", "error": None}

    def request(self, name: str, version: int, fmt: str) -> None:
        """Record that the export was asked for now (the caller sends the worker a message)."""
        self._write(self._file(name, version, fmt, "requested"), {"at": time.time()})
        self._file(name, version, fmt, "error").unlink(missing_ok=True)

    def build(self, settings: Settings, name: str, version: int, fmt: str) -> Path:
        """Make the archive unless it exists; return it.

        Waits for the build lock: another worker making the same export finishes first (and this one
        returns its archive), and an API process probing the lock (`state`) holds it only for an instant.
        """
        with self._lock(name, version, fmt, wait=True):
            existing = self.archive(name, version, fmt)
            if existing is not None:
                return existing
            try:
                return self._make(settings, name, version, fmt)
            except Exception as exc:
                message = exc.message if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
                logger.exception("export of %s v%s as %s failed", name, version, fmt)
                self._write(self._file(name, version, fmt, "error"), {"at": time.time(), "error": message})
                raise
            finally:
                self._file(name, version, fmt, "requested").unlink(missing_ok=True)

    def _make(self, settings: Settings, name: str, version: int, fmt: str) -> Path:
        from training.export import export_version  # TensorFlow and the converters: in the worker only

        archive = self._file(name, version, fmt, "tar.gz")
        with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".building-") as work:
            export_version(settings, name, version, fmt, Path(work) / "export")
            write_archive(Path(work) / "export", archive)
        logger.info("exported %s v%s as %s: %.1f MB", name, version, fmt, archive.stat().st_size / 2**20)
        return archive

    def discard(self, name: str, version: int) -> None:
        """Remove a version's exports (its version was deleted)."""
        shutil.rmtree(self.root / validate_name(name) / str(int(version)), ignore_errors=True)

    def _lock(self, name: str, version: int, fmt: str, wait: bool) -> contextlib.AbstractContextManager[bool]:
        """Hold the build lock (at once or not at all unless `wait`); yield whether it is held."""
        path = self._file(name, version, fmt, "lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return file_lock(path, wait)

    def _building(self, name: str, version: int, fmt: str) -> bool:
        """Whether a worker holds the build lock now."""
        path = self._file(name, version, fmt, "lock")
        if not path.exists():
            return False
        with self._lock(name, version, fmt, wait=False) as held:
            return not held

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("at"), (int, float)) else None

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
