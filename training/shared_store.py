"""The model store on storage every host shares: version files in object storage, numbers and pointers in SQL.

`SharedModelStore` answers everything `ModelStore` does (STORE_URL set: `ModelStore.from_settings`
opens it), for workers and API replicas on many hosts:
- a version's files go to `models/<name>/<version>/` in the object store, then one small `COMPLETE`
  object (the files' sizes and sha256, and their digest) last; only then does the job database mark
  the version complete (and publish it, by policy) in one transaction (`training/registry.py`).
  Readers list versions from the database, so a version whose upload died midway (no marker, still
  `uploading`) is never seen; the reconciler gives such uploads up and removes their objects;
- each host keeps the versions it used under `MODEL_DIR/.cache/<digest>/`, content-addressed (a
  version's digest names its files, so a copy can never be mistaken for another version's, even
  across a store that was reset), checked against the marker's hashes when downloaded, and bounded to
  MODEL_CACHE_MB (least recently used first);
- what a process last read of a model's versions and published version is trusted for
  PUBLISHED_TTL_S (a publish on one replica reaches the others within that), and forgotten at once
  after a change made in this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from training.errors import ModelNotFoundError, TrainingError
from training.objectstore import Objects, open_objects
from training.registry import VersionRegistry
from training.settings import Settings
from training.store import PUBLISH_POLICIES, ModelStore, disk_full_as_error, fsync_tree, validate_name

MARKER = "COMPLETE"
CACHE = ".cache"
# A cached copy used within this many seconds is never evicted: another process may be loading it.
IN_USE_SECONDS = 60.0
MIB = 2**20

log = logging.getLogger(__name__)

# One registry (engine) and one object client per store URL and process; snapshots shared by every store
# instance of the process, so a change through one is seen at once through the others.
_REGISTRIES: dict[str, VersionRegistry] = {}
_OBJECTS: dict[tuple[str, float], Objects] = {}
_SNAPSHOTS: dict[tuple[str, str], tuple[float, list[int], int | None]] = {}
_ROWS: dict[tuple[str, str, int], dict] = {}
_lock = threading.Lock()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, dict]:
    """Every file under `folder` by relative path, with its size and sha256."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(p for p in folder.rglob("*") if p.is_file())}


def content_digest(files: dict[str, dict]) -> str:
    """The digest of a version's files: the sha256 of their sorted names, sizes and hashes."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class SharedModelStore(ModelStore):
    """Versioned models in object storage, numbered and published in SQL, cached on this host under `root`."""

    def __init__(self, root: str | Path, objects: Objects, registry: VersionRegistry,
                 cache_bytes: int = 10240 * MIB, ttl_s: float = 2.0) -> None:
        super().__init__(root)
        self.objects, self.registry = objects, registry
        self.cache_root = self.root / CACHE
        self.cache_bytes, self.ttl_s = cache_bytes, ttl_s

    @classmethod
    def open(cls, settings: Settings) -> SharedModelStore:
        """The shared store of STORE_URL and the job database, cached under MODEL_DIR."""
        with _lock:
            registry = _REGISTRIES.setdefault(settings.database, VersionRegistry(settings.database))
            objects = _OBJECTS.get((settings.store_url, settings.store_timeout_s))
            if objects is None:
                objects = _OBJECTS[(settings.store_url, settings.store_timeout_s)] = open_objects(settings)
        return cls(settings.model_dir, objects, registry, settings.model_cache_mb * MIB, settings.published_ttl_s)

    # --- what the database says ---------------------------------------------------------------------------------

    def _snapshot(self, name: str, fresh: bool = False) -> tuple[list[int], int | None]:
        """A model's versions and published version, as read within the last `ttl_s` seconds (unless `fresh`)."""
        key = (self.registry.url, validate_name(name))
        cached = _SNAPSHOTS.get(key)
        if not fresh and cached is not None and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1], cached[2]
        versions, published = self.registry.snapshot(name)
        _SNAPSHOTS[key] = (time.monotonic(), versions, published)
        return versions, published

    def _forget(self, name: str) -> None:
        """Drop what this process read of a model, after changing it."""
        _SNAPSHOTS.pop((self.registry.url, name), None)

    def _row(self, name: str, version: int) -> dict:
        """A complete version's row (immutable once complete, so kept), after checking the version still exists."""
        version = int(version)
        if version not in self._snapshot(name)[0] and version not in self._snapshot(name, fresh=True)[0]:
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        key = (self.registry.url, name, version)
        if key not in _ROWS:
            _ROWS[key] = self.registry.version(name, version)
        return _ROWS[key]

    def names(self) -> list[str]:
        """Names of the models that have at least one version."""
        return self.registry.names()

    def versions(self, name: str) -> list[int]:
        """Version numbers of a model, ascending (only complete ones)."""
        return list(self._snapshot(name)[0])

    def published_version(self, name: str) -> int | None:
        """The published version, or None."""
        return self._snapshot(name)[1]

    def resolve_version(self, name: str, version: int | None = None) -> int:
        """Return `version` if it exists, else the published one when `version` is None."""
        if version is not None:
            self._row(name, version)
            return int(version)
        return super().resolve_version(name, None)

    def metadata(self, name: str, version: int) -> dict:
        """A version's metadata, with its version number and whether it is published (no download)."""
        data = dict(self._row(name, version)["meta"])
        data["version"] = int(version)
        data["published"] = self.published_version(name) == int(version)
        return data

    def labels(self, name: str, version: int) -> list[str]:
        """A version's class labels, in output order."""
        return list(self._row(name, version)["labels"])

    def version_of_job(self, name: str, job_id: str) -> int | None:
        """The version a training job already produced, or None."""
        return self.registry.version_of_job(validate_name(name), job_id)

    def identity(self, name: str, version: int) -> tuple:
        """What a version's files are: their digest."""
        return ("sha256", self._row(name, version)["digest"])

    # --- files on this host -------------------------------------------------------------------------------------

    def version_dir(self, name: str, version: int) -> Path:
        """This host's copy of a version's files, downloaded (and checked) on first use."""
        digest = self._row(name, version)["digest"]
        folder = self.cache_root / digest
        if folder.is_dir():
            os.utime(folder)  # recently used: evicted last
            return folder
        return self._download(name, int(version), digest)

    def _prefix(self, name: str, version: int) -> str:
        return f"models/{name}/{version}/"

    def _download(self, name: str, version: int, digest: str) -> Path:
        """Download a version's files into the cache, each checked against the marker's sha256."""
        prefix = self._prefix(name, version)
        marker = self.objects.get_bytes(prefix + MARKER)
        if marker is None:
            raise ModelNotFoundError(f"version {version} of {name!r} is recorded, but its files are missing from "
                                     f"{self.objects.url}")
        files = json.loads(marker)["files"]
        if content_digest(files) != digest:
            raise ModelNotFoundError(f"version {version} of {name!r} in {self.objects.url} does not match its "
                                     "record (the store and the job database disagree)")
        self.cache_root.mkdir(parents=True, exist_ok=True)
        staging = self.cache_root / f".staging-{uuid.uuid4().hex}"
        try:
            with disk_full_as_error(f"could not copy version {version} of {name!r} into {self.cache_root}"):
                for relative, expected in files.items():
                    target = staging / relative
                    if not self.objects.get_file(prefix + relative, target) or \
                            sha256_file(target) != expected["sha256"]:
                        raise ModelNotFoundError(f"file {relative} of version {version} of {name!r} is missing or "
                                                 f"damaged in {self.objects.url}")
                fsync_tree(staging)
                try:
                    os.rename(staging, self.cache_root / digest)
                except OSError:
                    if not (self.cache_root / digest).is_dir():
                        raise  # else another process downloaded the same version first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._prune(keep=digest)
        return self.cache_root / digest

    def _prune(self, keep: str) -> None:
        """Evict the least recently used copies until the cache fits MODEL_CACHE_MB (never one just used)."""
        copies = sorted((p for p in self.cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.stat().st_mtime)
        total = sum(folder_bytes(p) for p in copies)
        for folder in copies:
            if total <= self.cache_bytes:
                break
            if folder.name == keep or time.time() - folder.stat().st_mtime < IN_USE_SECONDS:
                continue
            total -= folder_bytes(folder)
            trash = self.cache_root / f".deleting-{uuid.uuid4().hex}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # --- writing ------------------------------------------------------------------------------------------------

    def save_version(self, name: str, write_files: Callable[[Path], None], metadata: dict,
                     labels: list[str], publish: str = "auto") -> tuple[int, bool]:
        """Upload a new version, marker last, then make it visible (and publish it by policy) in one transaction.

        A save that fails midway (the store or the database unreachable, the process killed) leaves
        no visible version: its number is given up, never reused, and its objects removed now or by
        the reconciler.
        """
        if publish not in PUBLISH_POLICIES:
            raise ValueError(f"publish must be one of {PUBLISH_POLICIES}, received: {publish!r}")
        validate_name(name)
        self.cache_root.mkdir(parents=True, exist_ok=True)
        staging = self.cache_root / f".staging-{uuid.uuid4().hex}"
        try:
            with disk_full_as_error(f"could not save a new version of {name!r} in {self.root}"):
                staging.mkdir()
                write_files(staging)
                (staging / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
                (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False),
                                                       encoding="utf-8")
                fsync_tree(staging)
            files = file_digests(staging)
            digest = content_digest(files)
            version = self.registry.reserve(name, metadata.get("job"))
            try:
                published = self._upload(name, version, staging, files, digest, metadata, labels, publish)
            except BaseException:
                self._give_up(name, version)
                raise
            finally:
                self._forget(name)
            try:
                os.rename(staging, self.cache_root / digest)  # this host keeps what it made
            except OSError:
                pass  # the same files are cached already
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version, published

    def _upload(self, name: str, version: int, staging: Path, files: dict[str, dict], digest: str,
                metadata: dict, labels: list[str], publish: str) -> bool:
        """Write a version's files, then its marker, then mark it complete; return whether it was published."""
        prefix = self._prefix(name, version)
        for relative in files:
            self.objects.put_file(prefix + relative, staging / relative)
        marker = {"name": name, "version": version, "digest": digest, "files": files}
        self.objects.put_bytes(prefix + MARKER, json.dumps(marker, indent=2).encode())
        return self.registry.complete(name, version, digest, metadata, labels, publish)

    def _give_up(self, name: str, version: int) -> None:
        """After a failed upload: record the number given up and remove what was written, as far as possible now."""
        try:
            self.registry.abandon(name, version)
            self.objects.delete_prefix(self._prefix(name, version))
            self.registry.purged(name, version)
        except TrainingError as exc:  # the store is still away: the reconciler finishes this
            log.warning("could not clean up the failed upload of version %s of %r yet: %s", version, name, exc)

    def publish(self, name: str, version: int) -> None:
        """Make `version` the published one (publish or roll back), in one transaction."""
        self.registry.publish(validate_name(name), int(version))
        self._forget(name)

    def apply_publish_policy(self, name: str, version: int, policy: str) -> bool:
        """Publish an existing version if `policy` says so (as `save_version` would); return whether it is published."""
        if policy not in PUBLISH_POLICIES:
            raise ValueError(f"policy must be one of {PUBLISH_POLICIES}, received: {policy!r}")
        try:
            return self.registry.apply_policy(validate_name(name), int(version), policy)
        finally:
            self._forget(name)

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version that is not the published one: gone from the database at once, its objects after."""
        self.registry.delete(validate_name(name), int(version))
        self._forget(name)
        try:
            self.objects.delete_prefix(self._prefix(name, int(version)))
            self.registry.purged(name, int(version))
        except TrainingError as exc:
            log.warning("version %s of %r is deleted; its objects are removed later: %s", version, name, exc)

    def sweep(self, older_than_seconds: float) -> list[Path]:
        """Give up uploads whose worker died, remove given-up versions' objects, and this host's leftovers."""
        swept = super().sweep(older_than_seconds)
        self.registry.stale_uploads(older_than_seconds)
        for name, version in self.registry.given_up():
            self.objects.delete_prefix(self._prefix(name, version))
            self.registry.purged(name, version)
            swept.append(Path(PurePosixPath(self.objects.url.replace("://", "/"), self._prefix(name, version))))
        return swept

    def readiness(self) -> str:
        """`ok` if the object store and the job database answer, else why not."""
        try:
            self.objects.list("models/.ready")
            self.registry.names()
        except TrainingError as exc:
            return exc.message
        return "ok"
