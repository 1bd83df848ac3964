"""Images decoded once per training run: the same pixels as `preprocess_image`, each file decoded once."""

from __future__ import annotations

import threading

import numpy as np

import training.decoded as decoded_module
from training.decoded import DecodedImages
from training.images import preprocess_image


def test_pixels_equal_the_one_preprocessing_and_each_file_is_decoded_once(small_digits_dir, tmp_path, monkeypatch):
    paths = sorted(small_digits_dir.glob("*/*.png"))[:10]
    calls, real = [], decoded_module.decode_resized

    def counting(data, size, max_pixels):
        calls.append(size)
        return real(data, size, max_pixels)

    monkeypatch.setattr(decoded_module, "decode_resized", counting)
    images = DecodedImages(paths, 32, tmp_path)
    expected = np.stack([preprocess_image(path.read_bytes(), 32) for path in paths])
    np.testing.assert_array_equal(images.batch(paths[:4]), expected[:4])
    threads = [threading.Thread(target=images.batch, args=(paths,)) for _ in range(3)]  # loader threads at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(images.batch(list(reversed(paths))), expected[::-1])
    np.testing.assert_array_equal(images.batch([paths[1], paths[1]]), expected[[1, 1]])
    assert len(calls) == len(paths)  # every later batch came from the decoded pixels
    assert (tmp_path / "decoded-32px.npy").stat().st_size >= 10 * 32 * 32 * 3  # on disk, not in memory
