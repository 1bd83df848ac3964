"""The feature cache shared through the object store: a shard computed on one host is read on every other.

A shard is uploaded as `features/<backbone id>/NAME.npy`, then `NAME.keys` (the marker: a shard
without its keys is not seen, as on disk). A lookup that misses locally lists the store's shards,
downloads the keys of those this host has never seen (small: 65 bytes an image) into
`.remote-keys/`, and then the rows of only those shards that hold a wanted image; so a worker never
downloads features it has or does not need. Keys are content hashes, so a shard is the same on every
host. This host's copy is bounded to FEATURE_CACHE_MB: the least recently read shards go first, and
come back from the store when needed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from training.features import FeatureCache
from training.objectstore import Objects
from training.settings import Settings
from training.store import write_file_atomic

REMOTE_KEYS = ".remote-keys"
MIB = 2**20


class SharedFeatureCache(FeatureCache):
    """Feature shards on this host (`root`), filled from and added to the object store."""

    def __init__(self, root: str | Path, backbone_id: str, feature_dim: int, objects: Objects,
                 max_bytes: int = 20480 * MIB) -> None:
        super().__init__(root, backbone_id, feature_dim)
        self.objects, self.max_bytes = objects, max_bytes
        self.prefix = f"features/{backbone_id}/"

    @classmethod
    def open(cls, settings: Settings, backbone_id: str, feature_dim: int) -> SharedFeatureCache:
        """The cache of one backbone in STORE_URL, with this host's copy under DATA_DIR/features."""
        from training.shared_store import SharedModelStore

        objects = SharedModelStore.open(settings).objects  # one client per process and store
        return cls(settings.feature_cache_dir, backbone_id, feature_dim, objects, settings.feature_cache_mb * MIB)

    def lookup(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached features of those images that have them, here or in the store, by content hash."""
        wanted = set(hashes)
        found = super().lookup(wanted)
        missing = wanted - found.keys()
        if missing and self._fetch(missing):
            found.update(super().lookup(missing))
        return found

    def _read_shard(self, keys_path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
        """Read a shard's wanted rows, marking it recently used when it had some."""
        rows = super()._read_shard(keys_path, wanted)
        if rows:
            with contextlib.suppress(OSError):
                os.utime(keys_path)
        return rows

    def _fetch(self, wanted: set[str]) -> int:
        """Download the store's shards that hold a wanted image and are not here; return how many."""
        here = {path.stem for path in self.root.glob("*.keys")}
        remote = sorted(key[len(self.prefix):-len(".keys")] for key in self.objects.list(self.prefix)
                        if key.endswith(".keys") and "/" not in key[len(self.prefix):])
        fetched = 0
        for name in remote:
            if name in here:
                continue
            keys_path = self.root / REMOTE_KEYS / f"{name}.keys"
            if not keys_path.is_file() and not self.objects.get_file(self.prefix + f"{name}.keys", keys_path):
                continue  # deleted meanwhile
            if wanted.isdisjoint(keys_path.read_text(encoding="ascii").split()):
                continue
            if self.objects.get_file(self.prefix + f"{name}.npy", self.root / f"{name}.npy"):
                keys = keys_path.read_bytes()
                write_file_atomic(self.root / f"{name}.keys", lambda handle, keys=keys: handle.write(keys))
                fetched += 1
        if fetched:
            self._prune()
        return fetched

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> str | None:
        """Store a new shard here, then in the object store (rows first, keys last)."""
        name = super().add(hashes, vectors)
        if name is not None:
            self.objects.put_file(self.prefix + f"{name}.npy", self.root / f"{name}.npy")
            self.objects.put_file(self.prefix + f"{name}.keys", self.root / f"{name}.keys")
            self._prune()
        return name

    def _prune(self) -> None:
        """Remove the least recently read shards until this host's copy fits FEATURE_CACHE_MB."""
        shards = sorted(self.root.glob("*.keys"), key=lambda path: path.stat().st_mtime)
        sizes = {path: path.stat().st_size + _size(path.with_suffix(".npy")) for path in shards}
        total = sum(sizes.values())
        for keys_path in shards[:-1]:  # the newest stays, whatever its size
            if total <= self.max_bytes:
                break
            # Keys first: a reader then no longer sees the shard, before its rows go.
            trash = self.root / f".deleting-{uuid.uuid4().hex}"
            trash.mkdir()
            os.rename(keys_path, trash / keys_path.name)
            with contextlib.suppress(FileNotFoundError):
                os.rename(keys_path.with_suffix(".npy"), trash / f"{keys_path.stem}.npy")
            shutil.rmtree(trash, ignore_errors=True)
            total -= sizes[keys_path]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
