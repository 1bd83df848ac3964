"""The plots saved with each version: PNGs of the expected size, nothing cut off at the edges."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from training.plots import DPI, plot_confusion_matrix, plot_history


def border_is_blank(path) -> bool:
    """Whether the image's outermost 2 pixels are all white: a label drawn past the figure's edge would not be."""
    pixels = np.asarray(Image.open(path).convert("L"))
    edges = np.concatenate([pixels[:2].ravel(), pixels[-2:].ravel(), pixels[:, :2].ravel(), pixels[:, -2:].ravel()])
    return bool((edges == 255).all())


@pytest.mark.parametrize("scale", [1.0, 12345.0])  # short and wide tick labels
def test_training_curves_fit_their_fixed_margins(tmp_path, scale):
    history = {"loss": [2.3 * scale, 1.1 * scale, 0.4 * scale], "val_loss": [2.4 * scale, 1.3 * scale, 0.7 * scale],
               "accuracy": [0.2, 0.6, 0.9], "val_accuracy": [0.1, 0.5, 0.8]}
    path = tmp_path / "training.png"
    plot_history(history, path, "Head training")
    assert Image.open(path).size == (9 * DPI, int(3.5 * DPI))
    assert border_is_blank(path)


def test_a_confusion_matrix_with_long_class_names_is_not_cut_off(tmp_path):
    classes = ["a", "a rather long class name for a label", "c"]
    path = tmp_path / "confusion_matrix.png"
    plot_confusion_matrix([[5, 1, 0], [0, 6, 0], [2, 0, 4]], classes, path)
    assert border_is_blank(path)
    assert len(np.unique(np.asarray(Image.open(path).convert("L")))) > 2  # cells and numbers drawn


def test_plots_drawn_in_threads_at_once_are_each_whole(tmp_path):
    # Figures, not pyplot's shared state: jobs in threads of one process can plot at the same time.
    history = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.8]}
    paths = [tmp_path / f"{index}.png" for index in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda path: plot_history(history, path), paths))
    first = np.asarray(Image.open(paths[0]))
    assert all(np.array_equal(np.asarray(Image.open(path)), first) for path in paths)
