"""The sample dataset and the demo that `make run` shows.

The sample is scikit-learn's handwritten digits (real data shipped in the
package), upscaled to RGB PNG files in one folder per class, so the repository
holds no image files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from training.errors import WeightsError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_images(image_size: int = 32, per_class: int | None = None,
                 classes: int = 10) -> list[tuple[str, np.ndarray]]:
    """Return (label, RGB uint8 image) pairs of the first `classes` digits, upscaled to image_size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken: dict[int, int] = {}
    pairs = []
    for pixels, target in zip(digits.images, digits.target):
        if target >= classes or per_class is not None and taken.get(target, 0) >= per_class:
            continue
        taken[target] = taken.get(target, 0) + 1
        gray = (255 - pixels / 16.0 * 255).astype(np.uint8)  # dark ink on white paper
        gray = cv2.resize(gray, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        pairs.append((DIGIT_NAMES[target], np.repeat(gray[..., None], 3, axis=-1)))
    return pairs


def write_digits_dataset(dest: str | Path, image_size: int = 32, per_class: int | None = None,
                         holdout: int = 0, classes: int = 10) -> list[Path]:
    """Write the digits as `dest/<label>/<n>.png`; return the paths of `holdout` images kept out of it."""
    dest = Path(dest)
    held: list[Path] = []
    counts: dict[str, int] = {}
    for label, image in digit_images(image_size, per_class, classes):
        counts[label] = counts.get(label, 0) + 1
        folder = dest / label
        if len(held) < holdout and counts[label] == 1:
            folder = dest.parent / f"{dest.name}-holdout"
            held.append(folder / f"{label}.png")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / (f"{label}.png" if folder.name.endswith("-holdout")
                                              else f"{counts[label]:04d}.png"))
    return held


def run_demo(settings, image_size: int, console, out) -> int:
    """Make the sample dataset, train a `digits` model on it and predict held-out images."""
    from training.options import parse_options
    from training.pipeline import train
    from training.predict import predict_files

    dataset = settings.data_dir / "sample" / "digits"
    holdout_dir = dataset.parent / "digits-holdout"
    if not dataset.is_dir():
        console.print(f"writing the sample dataset to {dataset}")
        write_digits_dataset(dataset, image_size=image_size, per_class=60, holdout=10)
    params = parse_options({"image_size": image_size, "epochs": 40, "publish": "always"})
    try:
        result = train(dataset, "digits", settings, params)
    except WeightsError as exc:
        console.print(f"[yellow]{exc}[/]\n[yellow]The demo goes on with BACKBONE_WEIGHTS=none "
                      "(random VGG19 weights): accuracy is lower than with ImageNet weights.[/]")
        settings = dataclasses.replace(settings, backbone_weights="none")
        result = train(dataset, "digits", settings, params)
    out.print(f"trained digits v{result.version}: validation accuracy {result.metrics['accuracy']:.3f} "
              f"on {result.metrics['samples']} images, stored in {settings.model_dir / 'digits'}")
    images = sorted(holdout_dir.glob("*.png"))
    _, answers = predict_files(settings, "digits", images, result.version, top_k=3)
    for path, answer in zip(images, answers):
        mark = "ok " if answer["label"] == path.stem else "BAD"
        out.print(f"{mark} {path.name}: predicted {answer['label']} ({answer['probability']:.2f})")
    out.print("next: python -m training --help, or `python -m training predict --model digits IMAGE`")
    return 0
