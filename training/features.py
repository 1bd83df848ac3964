"""Backbone features, computed once per image and cached on disk.

With a frozen backbone an image's features never change, so they are cached under
(backbone id, image content hash); the backbone id already names the weights,
feature layer, image size, preprocessing version and precision. Retraining on the same images,
or on a superset, runs the backbone only on images it has not seen.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.images import DEFAULT_MAX_PIXELS, preprocess_image
from training.progress import CancelFn, Progress, ProgressFn, never_cancel, no_progress, raise_if_cancelled
from training.store import fsync_dir, write_file_atomic

if TYPE_CHECKING:
    from training.settings import Settings

# Paths in, the backbone's float32 input out.
Loader = Callable[[Sequence[Path]], np.ndarray]
# Features written per shard: a crash or a cancel loses at most this many images' work, and a
# dataset of 20,000 images is a handful of files, each read with one memory-mapped gather.
SHARD_ROWS = 4096


class FeatureCache:
    """Feature vectors of one backbone on disk, in shards of contiguous rows.

    A shard is `NAME.npy` (float32 `[n, feature_dim]`) and `NAME.keys` (the n images' content hashes,
    one per line), written in that order, each flushed and renamed into place: a reader sees a
    shard whole or not at all, and writers never share a file. A shard that cannot be read or does
    not match its keys is ignored, so its images are computed again. One `.npy` per image (the
    layout before shards) is still read.
    """

    def __init__(self, root: str | Path, backbone_id: str, feature_dim: int) -> None:
        self.root = Path(root) / backbone_id
        self.feature_dim = feature_dim

    @classmethod
    def from_settings(cls, settings: Settings, backbone_id: str, feature_dim: int) -> FeatureCache:
        """The cache under the settings' feature folder (shared through the object store when STORE_URL is set)."""
        if settings.shared:
            from training.shared_features import SharedFeatureCache  # boto3 only when shared

            return SharedFeatureCache.open(settings, backbone_id, feature_dim)
        return cls(settings.feature_cache_dir, backbone_id, feature_dim)

    def lookup(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached features of those images that have them, by content hash."""
        wanted, found = set(hashes), {}
        for keys in sorted(self.root.glob("*.keys")):
            if wanted <= found.keys():
                break
            found.update(self._read_shard(keys, wanted - found.keys()))
        for sha256 in wanted - found.keys():
            vector = self._legacy(sha256)
            if vector is not None:
                found[sha256] = vector
        return found

    def _read_shard(self, keys_path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
        """The wanted rows of one shard, read by one gather from the memory-mapped rows; none if it is damaged."""
        try:
            keys = keys_path.read_text(encoding="ascii").split()
            rows = [(index, key) for index, key in enumerate(keys) if key in wanted]
            if not rows:
                return {}
            data = np.load(keys_path.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, UnicodeDecodeError):
            return {}  # torn or missing: its images are computed again
        if data.shape != (len(keys), self.feature_dim) or data.dtype != np.float32:
            return {}  # written by something else, or cut short: recomputed rather than trusted
        gathered = np.asarray(data[[index for index, _ in rows]])
        return {key: vector for (_, key), vector in zip(rows, gathered)}

    def _legacy(self, sha256: str) -> np.ndarray | None:
        """A vector of the one-file-per-image layout, or None when absent or damaged."""
        try:
            vector = np.load(self.root / sha256[:2] / f"{sha256}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return vector if vector.shape == (self.feature_dim,) and vector.dtype == np.float32 else None

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> str | None:
        """Store the features of images as one new shard: rows first, then the keys that make it visible.

        Returns the shard's name (None when there was nothing to store)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(hashes) != len(vectors) or vectors.shape[1:] != (self.feature_dim,):
            raise ValueError(f"vectors must be [{len(hashes)}, {self.feature_dim}], received: {list(vectors.shape)}")
        if not hashes:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        write_file_atomic(self.root / f"{name}.npy", lambda handle: np.save(handle, vectors, allow_pickle=False))
        keys = "".join(f"{sha256}\n" for sha256 in hashes).encode("ascii")
        write_file_atomic(self.root / f"{name}.keys", lambda handle: handle.write(keys))
        fsync_dir(self.root)
        return name


def load_batch(paths: Sequence[Path], image_size: int, pool: ThreadPoolExecutor,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and preprocess image files into one batch, decoding in parallel."""
    def load(path: Path) -> np.ndarray:
        return preprocess_image(Path(path).read_bytes(), image_size, max_pixels)

    return np.stack(list(pool.map(load, paths)))


def extract_features(
    items: Sequence,
    cache: FeatureCache,
    get_backbone: Callable,
    image_size: int,
    batch_size: int = 32,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    load: Loader | None = None,
) -> tuple[np.ndarray, int]:
    """Return the features of `items` (objects with `.path` and `.sha256`) and how many were computed.

    `load` turns a batch of paths into the backbone's input (default: decode them; a training run that
    fine-tunes passes its `DecodedImages.batch`, so each image is decoded once).

    Cached images are read from disk; the backbone is built (by `get_backbone`) only
    when some image is missing, and the next batch is decoded while the backbone
    runs on the current one.
    """
    vectors = cache.lookup(item.sha256 for item in items)
    missing = list({item.sha256: item for item in items if item.sha256 not in vectors}.values())
    total = len(missing)
    progress(Progress("features", 0, total))
    if missing:
        _compute(missing, cache, get_backbone(), image_size, batch_size, vectors, progress, cancel, load)
    return np.stack([vectors[item.sha256] for item in items]).astype(np.float32), total


def _compute(missing: Sequence, cache: FeatureCache, backbone, image_size: int, batch_size: int,
             vectors: dict[str, np.ndarray], progress: ProgressFn, cancel: CancelFn, load: Loader | None) -> None:
    """Run the backbone on the missing images into `vectors`, decoding the next batch while it runs.

    New features reach the cache a shard at a time, and what was computed before a cancel is kept.
    """
    total, unsaved = len(missing), []
    batches = [missing[i:i + batch_size] for i in range(0, total, batch_size)]

    def save() -> None:
        if unsaved:
            cache.add([item.sha256 for item in unsaved], np.stack([vectors[item.sha256] for item in unsaved]))
            unsaved.clear()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            ThreadPoolExecutor(max_workers=1) as prefetch:
        load = load or functools.partial(load_batch, image_size=image_size, pool=pool)
        pending = prefetch.submit(load, [i.path for i in batches[0]])
        done = 0
        try:
            for index, batch in enumerate(batches):
                raise_if_cancelled(cancel)
                pixels = pending.result()
                if index + 1 < len(batches):
                    pending = prefetch.submit(load, [i.path for i in batches[index + 1]])
                for item, vector in zip(batch, backbone.features(pixels)):
                    vectors[item.sha256] = vector
                unsaved.extend(batch)
                if len(unsaved) >= SHARD_ROWS:
                    save()
                done += len(batch)
                progress(Progress("features", done, total))
        finally:
            save()
