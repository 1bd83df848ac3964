"""Training at scale: time per image and peak memory from 1,000 to 20,000 images, and a warm cache load.

Each size trains a first version (features computed and cached) in a fresh process on a fresh
cache, so its peak RSS is its own. The images are scikit-learn's digits at 64 px, 20 classes
(the ten digits, and the ten mirrored), each drawn with its own small shift and noise so that
no two files are the same (ingest drops exact duplicates). Then, in one process, the features
of the largest dataset are loaded from the warm cache. Prints the table and the targets:
time per image flat within 10% of the smallest size's, warm load of 20,000 features < 1 s.

    BACKBONE_WEIGHTS=none .venv/bin/python bench/train_scale.py [--sizes 1000,5000,20000 --image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = 20


def write_images(root: Path, count: int, size: int, seed: int = 0) -> None:
    """Write `count` distinct digit images, `count / 20` per class, as PNG files in class folders."""
    from training.demo import digit_images

    by_digit: dict[str, list[np.ndarray]] = {}
    for label, image in digit_images(size):
        by_digit.setdefault(label, []).append(image)
    labels = sorted(by_digit)
    rng = np.random.default_rng(seed)
    for index in range(count):
        klass = index % CLASSES
        label = labels[klass % 10]
        image = by_digit[label][rng.integers(len(by_digit[label]))]
        if klass >= 10:
            label, image = f"{label}-mirrored", image[:, ::-1]
        shifted = np.roll(image, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.int16)
        noisy = np.clip(shifted + rng.integers(-8, 9, shifted.shape), 0, 255).astype(np.uint8)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(folder / f"{index:06d}.png")


def child(root: Path, work: Path, size: int) -> dict:
    """Train once on `root` with a fresh store and cache (this process); its timings and peak RSS."""
    from training.options import parse_options
    from training.pipeline import train
    from training.settings import Settings

    settings = Settings(model_dir=work / "models", data_dir=work / "data", backbone_weights="none",
                        keras_home=work / "keras", precision=os.environ.get("PRECISION", "float32"))
    started = time.perf_counter()
    result = train(root, "scale", settings, parse_options({"image_size": size, "epochs": 10}))
    seconds = time.perf_counter() - started
    return {"images": result.dataset["images"], "seconds": seconds, "timings": result.timings,
            "features_computed": result.features_computed, "accuracy": result.metrics["accuracy"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cache": str(work / "data")}


def warm_cache(cache_dir: Path, size: int):
    """The feature cache a child run filled (BACKBONE_WEIGHTS=none, the avg layer, its precision)."""
    from training.backbone import BackboneSpec, backbone_id, effective_precision, weights_id
    from training.features import FeatureCache

    spec = BackboneSpec("none", "avg", size)
    precision = effective_precision(os.environ.get("PRECISION", "float32"))
    return FeatureCache(cache_dir / "features", backbone_id(spec, weights_id("none"), precision), spec.feature_dim)


def hash_list(root: Path) -> list[str]:
    """The content hashes of a dataset's images, as ingest computes them."""
    from training.data.ingest import ingest

    with tempfile.TemporaryDirectory() as workdir:
        return [item.sha256 for item in ingest(root, Path(workdir) / "d").items]


def median_load(cache, hashes: list[str]) -> tuple[int, float]:
    """How many of `hashes` the cache holds, and the median seconds of 3 loads of them."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        found = cache.lookup(hashes)
        times.append(time.perf_counter() - started)
    return len(found), sorted(times)[1]


def legacy_load(vectors: dict[str, np.ndarray]) -> tuple[int, float]:
    """The same features in the layout before shards (one .npy per image), loaded the same way: the baseline."""
    from training.features import FeatureCache

    with tempfile.TemporaryDirectory() as workdir:
        legacy = FeatureCache(workdir, "legacy", next(iter(vectors.values())).shape[0])
        for sha256, vector in vectors.items():
            (legacy.root / sha256[:2]).mkdir(parents=True, exist_ok=True)
            np.save(legacy.root / sha256[:2] / f"{sha256}.npy", vector)
        return median_load(legacy, list(vectors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000", help="dataset sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "WORK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    for count in (int(n) for n in args.sizes.split(",")):
        root = work / f"images-{count}"
        write_images(root, count, args.image_size)
        done = subprocess.run([sys.executable, __file__, "--child", str(root), str(work / f"run-{count}"),
                               str(args.image_size)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["root"] = str(root)
        rows.append(row)
        print(f"{row['images']:>6} images: {row['seconds']:7.1f} s, {1000 * row['seconds'] / row['images']:6.2f} "
              f"ms/image (features {row['timings'].get('features', 0):.1f} s), peak RSS {row['peak_rss_mb']:.0f} MB, "
              f"accuracy {row['accuracy']:.3f}", flush=True)

    base = rows[0]["seconds"] / rows[0]["images"]
    print(f"\n{'images':>8} {'s/image vs the smallest':>24} {'peak RSS MB':>12}")
    for row in rows:
        ratio = row["seconds"] / row["images"] / base
        print(f"{row['images']:>8} {ratio:>24.3f} {row['peak_rss_mb']:>12.0f}")
    worst = max(row["seconds"] / row["images"] / base for row in rows)
    print(f"time per image flat within 10%: worst {worst:.3f}x of the smallest ({'met' if worst <= 1.1 else 'MISSED'})")
    largest = rows[-1]
    cache, hashes = warm_cache(Path(largest["cache"]), args.image_size), hash_list(Path(largest["root"]))
    count, seconds = median_load(cache, hashes)
    print(f"warm cache load of {count} features: {seconds:.3f} s (target < 1 s: {'met' if seconds < 1 else 'MISSED'})")
    legacy_count, legacy_seconds = legacy_load(cache.lookup(hashes))
    print(f"the same {legacy_count} features as one .npy per image (the layout before shards): {legacy_seconds:.3f} s, "
          f"{legacy_seconds / seconds:.0f}x the shards' time")

if __name__ == "__main__":
    main()
