"""Served precision vs trained precision: top-1 agreement and accuracy on validation images.

Trains one head in float32 and one in bfloat16 (PRECISION) on the same digits, then serves each
version's validation images in the precision it was trained in (the default) and in the other one
(SERVE_PRECISION), and prints the top-1 agreement between the two and the accuracy of each. Served in
its own precision, a version must reproduce its recorded validation accuracy exactly.

    BACKBONE_WEIGHTS=none .venv/bin/python bench/precision.py [--image-size 64] [--per-class 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from training.backbone import bfloat16_supported  # noqa: E402
from training.demo import write_digits_dataset  # noqa: E402
from training.options import parse_options  # noqa: E402
from training.pipeline import train  # noqa: E402
from training.settings import Settings  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def split_dataset(root: Path, image_size: int, per_class: int) -> Path:
    """Digits as train/ and val/ folders (a quarter of each class held out for validation)."""
    write_digits_dataset(root / "all", image_size=image_size, per_class=per_class)
    for label_dir in sorted((root / "all").iterdir()):
        images = sorted(label_dir.glob("*.png"))
        held = len(images) // 4
        for split, chosen in (("val", images[:held]), ("train", images[held:])):
            (root / "split" / split / label_dir.name).mkdir(parents=True)
            for image in chosen:
                shutil.copy(image, root / "split" / split / label_dir.name / image.name)
    return root / "split"


def served_labels(settings: Settings, serve_precision: str, version: int, images: list[Path]) -> list[str]:
    """Top-1 labels of `images` from the runtime serving `version` in `serve_precision`."""
    from service.runtime import ModelRuntime

    runtime = ModelRuntime(dataclasses.replace(settings, serve_precision=serve_precision))
    try:
        labels = []
        for start in range(0, len(images), 32):
            chunk = [p.read_bytes() for p in images[start:start + 32]]
            labels += [p["label"] for p in runtime.predict("digits", chunk, version=version)["predictions"]]
        return labels
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    if not bfloat16_supported():
        sys.exit("this machine has no native bfloat16 (no AVX512-BF16/AMX CPU, no GPU): nothing to compare")

    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    data = split_dataset(work, args.image_size, args.per_class)
    settings = Settings(model_dir=work / "models", data_dir=work / "data", backbone_weights="none")
    params = parse_options({"image_size": args.image_size, "publish": "never"})
    versions = {precision: train(data, "digits", dataclasses.replace(settings, precision=precision), params)
                for precision in PRECISIONS}
    images = sorted((data / "val").glob("*/*.png"))
    truth = [p.parent.name for p in images]
    print(f"{args.image_size} px, {len(images)} validation images, 10 classes, BACKBONE_WEIGHTS=none\n")
    print("trained in  recorded acc  served float32  served bfloat16  top-1 agreement")
    for trained, result in versions.items():
        served = {p: served_labels(settings, p, result.version, images) for p in PRECISIONS}
        accuracy = {p: float(np.mean([a == b for a, b in zip(served[p], truth)])) for p in PRECISIONS}
        agreement = float(np.mean([a == b for a, b in zip(*served.values())]))
        print(f"{trained:10s}  {result.metrics['accuracy']:12.2%}  {accuracy['float32']:14.2%}  "
              f"{accuracy['bfloat16']:15.2%}  {agreement:15.2%}")
        if accuracy[trained] != result.metrics["accuracy"]:
            sys.exit(f"served in its own precision, the {trained} version gave {accuracy[trained]:.4f}, "
                     f"not its recorded {result.metrics['accuracy']:.4f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
