"""The model store: versioned models on disk, read and written only through this module.

Layout: `<root>/<name>/<version>/` holds the Keras file (`head.keras` for head-only
models, `model.keras` for fine-tuned whole models), `labels.json`, `metadata.json`
and `plots/`. `<root>/<name>/published.json` names the published version.

A version is written into a hidden staging folder, flushed, then renamed into
place, so readers never see a half-written version; `published.json` is replaced
atomically, so a reader sees the old or the new version, never a mix. Models are
loaded only from the store, with Keras safe mode on.

`<root>/<name>/counter.json` records the highest version number ever handed out, so
a number is never given twice, even after the newest version was deleted: serving
caches are keyed by (name, version) and must never mistake new weights for old ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from training.errors import InvalidInput, ModelNotFoundError, StoreConflictError, StoreFullError

if TYPE_CHECKING:
    from training.settings import Settings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODEL_FILES = {"head": "head.keras", "full": "model.keras"}
PUBLISH_POLICIES = ("auto", "always", "never")
COUNTER_FILE = "counter.json"
# A full disk, or a user or project over its quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger(__name__)


def validate_name(name: str) -> str:
    """Check a model name: letters, digits, '.', '_' and '-', 1 to 64 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise InvalidInput(
            f"model name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"received: {name!r}"
        )
    return name


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let `write` fill a temporary file, flush it to disk, and rename it over `path` (a reader sees all or none)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file, flush it to disk, and rename it over `path`."""
    write_file_atomic(path, lambda handle: handle.write(json.dumps(data, indent=2, ensure_ascii=False).encode()))
    fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` across processes; yield False at once if `wait` is off and it is taken."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def disk_full_as_error(what: str) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) into a StoreFullError saying what was not written."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise StoreFullError(f"disk full: {what}: {exc.strerror} ({errno.errorcode[exc.errno]}); "
                             "nothing was saved, free space and try again", exc.errno) from exc


def publish_decision(policy: str, new: dict, current: dict | None) -> bool:
    """Whether a version with metadata `new` is published over `current` (None: nothing published) by `policy`.

    `auto` publishes the first version, and a later one whose validation accuracy is at least the
    published version's; `always`; `never`.
    """
    if policy == "always" or current is None and policy == "auto":
        return True
    if policy == "never":
        return False
    return new.get("metrics", {}).get("accuracy", 0.0) >= current.get("metrics", {}).get("accuracy", 0.0)


# Hidden work folders: a save or upload in progress, or a removal; never a version or a dataset.
LEFTOVER_PREFIXES = (".staging-", ".deleting-")


def sweep_leftovers(folder: Path, older_than_seconds: float) -> list[Path]:
    """Remove the hidden work folders in `folder` untouched for `older_than_seconds` (a crash's leftovers)."""
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_seconds
    swept = []
    for entry in folder.iterdir():
        if entry.name.startswith(LEFTOVER_PREFIXES) and entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(entry)
    return swept


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


class ModelStore:
    """Versioned models under one root folder (`MODEL_DIR`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The store the settings name: this folder (`MODEL_DIR`), or the shared one when STORE_URL is set."""
        if settings.shared:
            from training.shared_store import SharedModelStore  # boto3 and the registry only when shared

            return SharedModelStore.open(settings)
        return cls(settings.model_dir)

    def identity(self, name: str, version: int) -> tuple:
        """What a version's files are now (inode and mtime of its metadata): a replaced version is another."""
        stat = (self.version_dir(name, version) / "metadata.json").stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def readiness(self) -> str:
        """`ok`: a local store's readiness is its folder's, which the service checks itself."""
        return "ok"

    def model_dir(self, name: str) -> Path:
        """The folder of one model's versions."""
        return self.root / validate_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        """The folder of one version; raises ModelNotFoundError if absent."""
        path = self.model_dir(name) / str(int(version))
        if not path.is_dir():
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        return path

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serialize writers of one model (version numbering, publishing) across processes."""
        folder = self.model_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / ".lock"):
            yield

    def names(self) -> list[str]:
        """Names of the models that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_PATTERN.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Version numbers of a model, ascending (staging folders are not versions)."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def published_version(self, name: str) -> int | None:
        """The published version, or None."""
        try:
            data = json.loads((self.model_dir(name) / "published.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        version = int(data["version"])
        return version if (self.model_dir(name) / str(version)).is_dir() else None

    def resolve_version(self, name: str, version: int | None = None) -> int:
        """Return `version` if it exists, else the published one when `version` is None."""
        if not self.versions(name):
            raise ModelNotFoundError(f"no model named {name!r}")
        if version is None:
            published = self.published_version(name)
            if published is None:
                raise ModelNotFoundError(f"model {name!r} has no published version")
            return published
        self.version_dir(name, version)
        return int(version)

    def metadata(self, name: str, version: int) -> dict:
        """A version's metadata, with its version number and whether it is published."""
        data = json.loads((self.version_dir(name, version) / "metadata.json").read_text(encoding="utf-8"))
        data["version"] = int(version)
        data["published"] = self.published_version(name) == int(version)
        return data

    def describe(self, name: str) -> dict:
        """One model: its versions (metadata) and the published version."""
        versions = [self.metadata(name, v) for v in self.versions(name)]
        if not versions:
            raise ModelNotFoundError(f"no model named {name!r}")
        return {"name": name, "published": self.published_version(name), "versions": versions}

    def version_of_job(self, name: str, job_id: str) -> int | None:
        """The version a training job already produced, or None."""
        for version in self.versions(name):
            if self.metadata(name, version).get("job") == job_id:
                return version
        return None

    def save_version(self, name: str, write_files: Callable[[Path], None], metadata: dict,
                     labels: list[str], publish: str = "auto") -> tuple[int, bool]:
        """Write a new version atomically; return its number and whether it was published.

        `write_files(folder)` writes the model file and plots into the staging folder.
        Publish policy: `auto` publishes the first version, and a later one whose
        validation accuracy is at least the published version's; `always`; `never`.
        """
        if publish not in PUBLISH_POLICIES:
            raise ValueError(f"publish must be one of {PUBLISH_POLICIES}, received: {publish!r}")
        folder = self.model_dir(name)
        with disk_full_as_error(f"could not save a new version of {name!r} in {self.root}"):
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                write_files(staging)
                (staging / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
                (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False),
                                                       encoding="utf-8")
                fsync_tree(staging)
                with self._lock(name):
                    version = self._rename_into_place(staging, folder)
                    try:
                        published = self._should_publish(name, metadata, publish)
                        if published:
                            self._write_published(name, version)
                    except OSError as exc:
                        # The disk filled up between the rename and publishing: take the version back,
                        # so a failed save leaves no version behind (unless it did get published).
                        if exc.errno in DISK_FULL_ERRNOS and self.published_version(name) != version:
                            self._discard(folder / str(version))
                        raise
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return version, published

    def sweep(self, older_than_seconds: float) -> list[Path]:
        """Remove what crashed saves and removals left behind, in every model's folder."""
        if not self.root.is_dir():
            return []
        return [path for folder in self.root.iterdir() if folder.is_dir()
                for path in sweep_leftovers(folder, older_than_seconds)]

    def _discard(self, path: Path) -> None:
        """Make a version folder disappear atomically, then remove its files."""
        trash = path.parent / f".deleting-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _last_issued(self, name: str) -> int:
        """The highest version number the counter says was handed out; 0 for a store without one."""
        path = self.model_dir(name) / COUNTER_FILE
        try:
            return int(json.loads(path.read_text(encoding="utf-8"))["last"])
        except FileNotFoundError:
            return 0  # a store from before the counter: the folders alone say which numbers are taken
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so only a hand edit gets here; the folders still rule out the numbers in use.
            log.warning("ignoring unreadable %s: %s", path, exc)
            return 0

    def _reserve_version(self, name: str) -> int:
        """Hand out the next version number and record it before it is used (call under `_lock`)."""
        version = max(self._last_issued(name), *self.versions(name), 0) + 1
        # Recorded first: after a crash or a delete the number stays taken (skipped, never reused).
        write_json_atomic(self.model_dir(name) / COUNTER_FILE, {"last": version})
        return version

    def _rename_into_place(self, staging: Path, folder: Path) -> int:
        """Rename the staging folder to a newly reserved version number."""
        while True:
            version = self._reserve_version(folder.name)
            try:
                os.rename(staging, folder / str(version))
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # Taken by a writer that did not hold the lock: reserve the next number.
            fsync_dir(folder)
            return version

    def _should_publish(self, name: str, metadata: dict, policy: str) -> bool:
        current = self.published_version(name)
        return publish_decision(policy, metadata, None if current is None else self.metadata(name, current))

    def apply_publish_policy(self, name: str, version: int, policy: str) -> bool:
        """Publish an existing version if `policy` says so (as `save_version` would); return whether it is published.

        For a job re-run after a crash between saving its version and publishing it. A version
        that is already published stays so, whatever the policy.
        """
        if policy not in PUBLISH_POLICIES:
            raise ValueError(f"policy must be one of {PUBLISH_POLICIES}, received: {policy!r}")
        self.version_dir(name, version)  # before locking, so a missing model leaves no folder behind
        with self._lock(name), disk_full_as_error(f"could not publish version {version} of {name!r}"):
            self.version_dir(name, version)
            if self.published_version(name) == int(version):
                return True
            if not self._should_publish(name, self.metadata(name, version), policy):
                return False
            self._write_published(name, version)
            return True

    def _write_published(self, name: str, version: int) -> None:
        write_json_atomic(self.model_dir(name) / "published.json", {"version": int(version)})

    def publish(self, name: str, version: int) -> None:
        """Make `version` the published one (publish or roll back), atomically."""
        self.version_dir(name, version)  # before locking, so a missing model leaves no folder behind
        with self._lock(name), disk_full_as_error(f"could not publish version {version} of {name!r}"):
            self.version_dir(name, version)
            self._write_published(name, version)

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version that is not the published one."""
        self.version_dir(name, version)
        with self._lock(name):
            path = self.version_dir(name, version)
            if self.published_version(name) == int(version):
                raise StoreConflictError(f"version {version} of {name!r} is published; publish another first")
            trash = path.parent / f".deleting-{uuid.uuid4().hex}"
            os.rename(path, trash)  # Disappears atomically; the files go after.
            shutil.rmtree(trash, ignore_errors=True)

    def model_path(self, name: str, version: int) -> tuple[str, Path]:
        """The kind (`head` or `full`) and Keras file of a version."""
        folder = self.version_dir(name, version)
        for kind, filename in MODEL_FILES.items():
            if (folder / filename).is_file():
                return kind, folder / filename
        raise ModelNotFoundError(f"version {version} of {name!r} has no model file")

    def load_keras_model(self, name: str, version: int):
        """Load a version's Keras model from the store, with safe mode on."""
        import keras

        _, path = self.model_path(name, version)
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    def labels(self, name: str, version: int) -> list[str]:
        """A version's class labels, in output order."""
        return json.loads((self.version_dir(name, version) / "labels.json").read_text(encoding="utf-8"))
