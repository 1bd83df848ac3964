"""Training and serving on whatever accelerator Keras' backend sees: the ratios of the CPU benchmarks, on a GPU.

Run by bench/gpu.sh (which picks the backend: torch where PyTorch sees a GPU, else jax). In one
process, on the same images (real digits at --image-size, BACKBONE_WEIGHTS=none):
  raw     the backbone alone, `predict_on_batch` on batches of --batch, float32 and bfloat16;
  first   the first training of a head (features computed and cached), against one backbone pass;
  serve   the service's runtime (micro-batcher, shared backbone, head) under 16 client threads,
          against the raw backbone (no HTTP: Flask and gunicorn are not on the GPU hosts);
and prints images/s, the ratios and the accelerator's peak memory. The service's defaults are
used unless MAX_BATCH_SIZE / MAX_BATCH_WAIT_MS are set.

    KERAS_BACKEND=torch BACKBONE_WEIGHTS=none python3 bench/gpu.py [--images 512 --image-size 224]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from training.backbone import BackboneSpec, build_backbone, clear_shared_backbones  # noqa: E402
from training.demo import write_digits_dataset  # noqa: E402
from training.images import preprocess_image  # noqa: E402
from training.options import parse_options  # noqa: E402
from training.pipeline import train  # noqa: E402
from training.settings import Settings  # noqa: E402


def device_name() -> str:
    """The accelerator the backend computes on, in words."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (torch)"
    if backend == "jax":
        import jax

        return str(jax.devices()[0])
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name if gpus else "cpu (tensorflow)"


def peak_memory_mb() -> float | None:
    """The accelerator's peak allocated memory so far (torch), or None where the backend does not say."""
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or None
    return None


def raw_rate(pixels: np.ndarray, size: int, precision: str, batch: int, repeats: int = 3) -> float:
    """Images/s of the plain backbone on `pixels` (warmed up first), median of `repeats` passes."""
    backbone = build_backbone(BackboneSpec("none", "avg", size), precision=precision)
    backbone.features(pixels[:batch])  # build and compile for this batch size
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(pixels) - batch + 1, batch):
            backbone.features(pixels[start:start + batch])
        times.append(time.perf_counter() - started)
    return (len(pixels) // batch * batch) / statistics.median(times)


def serve_rate(settings: Settings, images: list[bytes], clients: int, seconds: float) -> float:
    """Images/s of the service's runtime with `clients` threads each sending one image at a time."""
    from service.runtime import ModelRuntime

    runtime = ModelRuntime(settings)
    runtime.predict("gpu", images[:1])  # load the model and the backbone
    done, stop = [0] * clients, threading.Event()

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        while not stop.is_set():
            runtime.predict("gpu", [images[rng.integers(len(images))]])
            done[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 4)  # warm: every batch size the batcher forms has run once
    before, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    rate = (sum(done) - before) / (time.perf_counter() - started)
    stop.set()
    for thread in threads:
        thread.join()
    runtime.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds of the serving run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    root = work / "digits"
    write_digits_dataset(root, image_size=args.image_size, per_class=args.images // 8, classes=8)
    paths = sorted(root.glob("*/*.png"))
    images = [path.read_bytes() for path in paths]
    pixels = np.stack([preprocess_image(data, args.image_size) for data in images])
    print(f"backend {keras.backend.backend()} on {device_name()}; {len(paths)} images at {args.image_size} px",
          flush=True)

    raw = {p: raw_rate(pixels, args.image_size, p, args.batch) for p in ("float32", "bfloat16")}
    for precision, rate in raw.items():
        print(f"raw backbone {precision:>8}: {rate:8.1f} images/s (batch {args.batch})", flush=True)
    print(f"bfloat16 / float32: {raw['bfloat16'] / raw['float32']:.2f}x", flush=True)

    for precision in ("float32", "bfloat16"):
        settings = dataclasses.replace(Settings.from_env(), model_dir=work / f"models-{precision}",
                                       data_dir=work / f"data-{precision}", backbone_weights="none",
                                       keras_home=work / "keras", precision=precision)
        clear_shared_backbones()
        started = time.perf_counter()
        train(root, "gpu", settings, parse_options({"image_size": args.image_size, "epochs": 10}))
        first = time.perf_counter() - started
        one_pass = len(paths) / raw[precision]
        print(f"first training ({precision}): {first:.1f} s = {first / one_pass:.2f}x one backbone pass "
              f"({one_pass:.1f} s); target <= 1.05", flush=True)
        rate = serve_rate(settings, images, clients=16, seconds=args.seconds)
        print(f"serve ({precision}, 16 clients, the runtime without HTTP): {rate:.1f} images/s = "
              f"{rate / raw[precision]:.2f}x the raw backbone; target >= 0.95", flush=True)
    memory = peak_memory_mb()
    print(f"peak accelerator memory: {memory:.0f} MiB" if memory else "peak accelerator memory: not reported")


if __name__ == "__main__":
    main()
