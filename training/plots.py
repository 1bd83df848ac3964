"""PNG plots saved with each model version: training curves and the confusion matrix.

Drawn on `matplotlib.figure.Figure` objects, not pyplot: no global figure registry to close, and safe
in a thread. Every run pays for them on its critical path, so the curves (fixed labels) use fixed
margins instead of a tight layout, which draws the figure twice; the confusion matrix keeps the tight
layout, as its class names can be of any length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

DPI = 80


def plot_history(history: dict[str, list[float]], path: Path, title: str = "Training") -> None:
    """Plot loss and accuracy per epoch, training and validation, to a PNG."""
    fig = Figure(figsize=(9, 3.5))
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                values = history[key]
                ax.plot(range(1, len(values) + 1), values, style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.84, wspace=0.22)
    fig.savefig(path, dpi=DPI)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    """Draw the confusion matrix (rows: true, columns: predicted) to a PNG."""
    counts = np.asarray(matrix)
    size = min(12, 2.5 + 0.45 * len(classes))
    fig = Figure(figsize=(size, size), layout="tight")
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, col), value in np.ndenumerate(counts):
            ax.text(col, row, str(value), ha="center", va="center",
                    color="white" if value > threshold else "black", fontsize=8)
    fig.savefig(path, dpi=DPI)
