"""Images decoded once per training run: resized RGB pixels kept in a memory-mapped array.

Fine-tuning reads every training image once an epoch and the validation images again afterwards;
decoding a photo costs more than the backbone's pass over it at small sizes. `DecodedImages` decodes
each file the first time it is asked for and keeps its resized uint8 pixels (a quarter of the float32
input) in a file under the run's work folder, so later epochs only apply VGG19's preprocessing. The
pixels are exactly `preprocess_image`'s: the same decode and resize, the same preprocessing after.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from training.images import DEFAULT_MAX_PIXELS, decode_resized, vgg19_preprocess


class DecodedImages:
    """The resized pixels of a fixed list of image files, decoded on first use, at most once each."""

    def __init__(self, paths: Sequence[str | Path], image_size: int, folder: str | Path,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 4) -> None:
        self.index = {str(path): row for row, path in enumerate(paths)}
        self.image_size, self.max_pixels = image_size, max_pixels
        shape = (len(self.index), image_size, image_size, 3)
        self.pixels = np.lib.format.open_memmap(Path(folder) / f"decoded-{image_size}px.npy", mode="w+",
                                                dtype=np.uint8, shape=shape)
        self.decoded = np.zeros(len(self.index), dtype=bool)
        self.threads = threads
        self._lock = threading.Lock()

    def _decode(self, path: str) -> None:
        row = self.index[path]
        self.pixels[row] = decode_resized(Path(path).read_bytes(), self.image_size, self.max_pixels)
        self.decoded[row] = True

    def batch(self, paths: Sequence[str | Path]) -> np.ndarray:
        """The backbone's float32 input for `paths`, decoding those seen for the first time (in parallel)."""
        names = [str(path) for path in paths]
        with self._lock:  # one decode per image, even when the loader's threads ask at once
            missing = list(dict.fromkeys(name for name in names if not self.decoded[self.index[name]]))
            if missing:
                with ThreadPoolExecutor(max_workers=min(self.threads, len(missing))) as pool:
                    list(pool.map(self._decode, missing))
        return vgg19_preprocess(self.pixels[[self.index[name] for name in names]])
