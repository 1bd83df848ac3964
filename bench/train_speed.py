"""Training speed: our cached-feature pipeline against the classic Keras recipes, in one run.

On the same images (default: 128 digits at 224 px, BACKBONE_WEIGHTS=none) it times
  (a) the naive recipe: frozen VGG19 + head as one Keras model, `fit` for N epochs;
  (b) the course recipe: first 10 layers frozen, the rest trained, N epochs;
  (c) our pipeline, first run (features computed and cached), N head epochs;
  (d) our pipeline again on the same images (features from the cache);
  (e) one plain backbone forward pass over the images (already decoded, model built):
      `predict_on_batch` on batches of 32, the fastest plain Keras call here;
  (f) with --fine-tune N: a first run that also fine-tunes N epochs, each image decoded once for the
      run (`DecodedImages`), against the same run decoding the files every epoch (the way before);
and prints the ratios against the targets a/c >= 20, c/d >= 25, c <= 1.05 e. PRECISION (float32,
bfloat16) applies to (c), (d) and (e) alike. c, d and e are medians of --repeats runs; a, b and f run
once each (they take minutes).

    BACKBONE_WEIGHTS=none .venv/bin/python bench/train_speed.py [--images 128 --image-size 224]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from training.backbone import BackboneSpec, build_backbone, clear_shared_backbones, effective_precision  # noqa: E402
from training.demo import write_digits_dataset  # noqa: E402
from training.images import preprocess_image  # noqa: E402
from training.options import parse_options  # noqa: E402
from training.pipeline import train  # noqa: E402
from training.settings import Settings  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_images(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(root.glob("*/*.png"))
    classes = sorted({p.parent.name for p in paths})
    pixels = np.stack([preprocess_image(p.read_bytes(), size) for p in paths])
    return pixels, np.array([classes.index(p.parent.name) for p in paths])


def keras_recipe(root: Path, size: int, epochs: int, frozen_layers: int | None) -> None:
    """The notebook way: one Keras model, images through the backbone every epoch."""
    x, y = load_images(root, size)
    base = build_backbone(BackboneSpec("none", "avg", size)).model
    base.trainable = frozen_layers is not None
    if frozen_layers is not None:
        for layer in base.layers[:frozen_layers]:
            layer.trainable = False
    model = keras.Sequential([base, keras.layers.Dense(256, activation="elu"),
                              keras.layers.Dense(int(y.max()) + 1, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-keras", action="store_true", help="skip (a) and (b), the slow baselines")
    parser.add_argument("--skip-course", action="store_true", help="skip (b), the slowest baseline")
    parser.add_argument("--fine-tune", type=int, default=0, metavar="EPOCHS",
                        help="also time (f), fine-tuning EPOCHS epochs with and without decoding once")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    classes = 8
    root = work / "images"
    write_digits_dataset(root, image_size=args.image_size, per_class=args.images // classes, classes=classes)
    n_images = len(list(root.glob("*/*.png")))
    options = {"image_size": args.image_size, "epochs": args.epochs, "patience": args.epochs, "publish": "always"}
    params = parse_options(options)
    print(f"{n_images} images, {args.image_size} px, {args.epochs} epochs, keras backend {keras.backend.backend()}")

    precision = effective_precision(os.environ.get("PRECISION", "float32"))
    print(f"precision {precision}")
    c_times, d_times, e_times = [], [], []
    for repeat in range(args.repeats):
        settings = bench_settings(work / f"run{repeat}", precision)
        clear_shared_backbones()  # (c) pays for building the backbone, as a fresh worker does
        c_times.append(timed(lambda s=settings: train(root, "bench", s, params)))
        d_times.append(timed(lambda s=settings: train(root, "bench", s, params)))
        x, _ = load_images(root, args.image_size)
        model = build_backbone(BackboneSpec("none", "avg", args.image_size), precision=precision).model
        e_times.append(timed(lambda m=model, x=x: [m.predict_on_batch(x[i:i + 32]) for i in range(0, len(x), 32)]))
        print(f"run {repeat + 1}: c={c_times[-1]:.2f}s d={d_times[-1]:.2f}s e={e_times[-1]:.2f}s", flush=True)
    c, d, e = (statistics.median(t) for t in (c_times, d_times, e_times))

    a = b = None
    if not args.skip_keras:
        a = timed(lambda: keras_recipe(root, args.image_size, args.epochs, frozen_layers=None))
        print(f"(a) naive frozen VGG19 + head, fit {args.epochs} epochs: {a:.1f}s", flush=True)
        if not args.skip_course:
            b = timed(lambda: keras_recipe(root, args.image_size, args.epochs, frozen_layers=10))
            print(f"(b) first 10 layers frozen, rest trained, {args.epochs} epochs: {b:.1f}s", flush=True)

    f = fine_tune_times(root, work, options, precision, args.fine_tune) if args.fine_tune else None

    print("\nratio                                   measured  target")
    if a is not None:
        print(f"a/c  naive Keras recipe / ours         {a / c:8.1f}  >= 20")
        if b is not None:
            print(f"b/c  course recipe / ours              {b / c:8.1f}  (for scale)")
    print(f"c/d  first run / cached re-run         {c / d:8.1f}  >= 25")
    print(f"c/e  first run / one backbone pass     {c / e:8.2f}  <= 1.05")
    if f is not None:
        print(f"f    fine-tune, decoding every epoch / decoding once  {f[0] / f[1]:5.2f}  (> 1: decoding once is "
              f"faster; {f[0]:.1f} s against {f[1]:.1f} s)")


def bench_settings(folder: Path, precision: str) -> Settings:
    """Settings for one run: its own store and cache, random weights, the precision asked for."""
    return dataclasses.replace(Settings.from_env(), model_dir=folder / "models", data_dir=folder / "data",
                               backbone_weights="none", keras_home=folder / "keras", precision=precision)


def fine_tune_times(root: Path, work: Path, options: dict, precision: str, epochs: int) -> tuple[float, float]:
    """A first run that fine-tunes, decoding every file every epoch (the way before), then decoding each once."""
    import training.pipeline as pipeline
    from training.features import load_batch

    params = parse_options(options | {"fine_tune": True, "fine_tune_epochs": epochs, "fine_tune_keep": "always"})

    class DecodeEveryTime:
        def __init__(self, paths, image_size, folder, max_pixels):
            self.pool = ThreadPoolExecutor(max_workers=4)
            self.batch = functools.partial(load_batch, image_size=image_size, pool=self.pool, max_pixels=max_pixels)

    times = []
    for label, decoder in (("every epoch", DecodeEveryTime), ("once", pipeline.DecodedImages)):
        original, pipeline.DecodedImages = pipeline.DecodedImages, decoder
        try:
            clear_shared_backbones()
            times.append(timed(lambda: train(root, "tuned", bench_settings(work / f"tune-{len(times)}", precision),
                                             params)))
        finally:
            pipeline.DecodedImages = original
        print(f"(f) first run with {epochs} fine-tune epochs, decoding {label}: {times[-1]:.1f}s", flush=True)
    return times[0], times[1]


if __name__ == "__main__":
    main()
