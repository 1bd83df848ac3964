"""Backbone features, computed once per image and cached on disk.

With a frozen backbone an image's features never change, so they are cached under
(backbone id, image content hash); the backbone id already names the weights,
feature layer, image size, preprocessing version and precision. Retraining on the same images,
or on a superset, runs the backbone only on images it has not seen.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from training.images import DEFAULT_MAX_PIXELS, preprocess_image
from training.progress import CancelFn, Progress, ProgressFn, never_cancel, no_progress, raise_if_cancelled


class FeatureCache:
    """Feature vectors on disk, one `.npy` file per image, for one backbone."""

    def __init__(self, root: str | Path, backbone_id: str, feature_dim: int) -> None:
        self.root = Path(root) / backbone_id
        self.feature_dim = feature_dim

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        """Return the cached features of an image, or None when absent or damaged."""
        try:
            vector = np.load(self._path(sha256), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            # Missing, or torn by a power loss (an empty file is an EOFError): recomputed.
            return None
        if vector.shape != (self.feature_dim,) or vector.dtype != np.float32:
            return None  # Written by something else: recomputed rather than trusted.
        return vector

    def put(self, sha256: str, vector: np.ndarray) -> None:
        """Store an image's features atomically (concurrent writers are safe)."""
        path = self._path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
) -> tuple[np.ndarray, int]:
    """Return the features of `items` (objects with `.path` and `.sha256`) and how many were computed.

    Cached images are read from disk; the backbone is built (by `get_backbone`) only
    when some image is missing, and the next batch is decoded while the backbone
    runs on the current one.
    """
    vectors: dict[str, np.ndarray] = {}
    for item in items:
        if item.sha256 not in vectors:
            cached = cache.get(item.sha256)
            if cached is not None:
                vectors[item.sha256] = cached
    missing = list({item.sha256: item for item in items if item.sha256 not in vectors}.values())
    total = len(missing)
    progress(Progress("features", 0, total))
    if missing:
        backbone = get_backbone()
        batches = [missing[i:i + batch_size] for i in range(0, total, batch_size)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
                ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(load_batch, [i.path for i in batches[0]], image_size, pool)
            done = 0
            for index, batch in enumerate(batches):
                raise_if_cancelled(cancel)
                pixels = pending.result()
                if index + 1 < len(batches):
                    pending = prefetch.submit(load_batch, [i.path for i in batches[index + 1]], image_size, pool)
                features = backbone.features(pixels)
                for item, vector in zip(batch, features):
                    cache.put(item.sha256, vector)
                    vectors[item.sha256] = vector
                done += len(batch)
                progress(Progress("features", done, total))
    return np.stack([vectors[item.sha256] for item in items]).astype(np.float32), total
