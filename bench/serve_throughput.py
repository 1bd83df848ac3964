"""Serving throughput and latency under gunicorn, against the raw backbone, in one run.

Trains a 224 px model on real digits (BACKBONE_WEIGHTS=none), starts the service
under gunicorn on a free loopback port, sends real JPEG files from N concurrent
clients (N = 1, 4, 16) and reports images/s and p50/p99 latency. In the same run
it measures the raw backbone (`predict_on_batch`, same image size, batch sizes 1
and 16), bfloat16 against float32 (throughput and top-1 agreement), the memory of
serving 20 head-only models against one, and scoring one image with 10 models
against one. Prints the ratios against the targets of issue 3.

    .venv/bin/python bench/serve_throughput.py [--seconds 20] [--image-size 224]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg_files(source: Path, dest: Path, count: int) -> list[bytes]:
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    payloads = []
    for path in sorted(source.glob("*/*.png"))[:count]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=90)
        (dest / f"{path.parent.name}-{path.stem}.jpg").write_bytes(buffer.getvalue())
        payloads.append(buffer.getvalue())
    return payloads


class Server:
    """The service under gunicorn, one worker, on a free loopback port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "1",
               "THREADS": "32"}
        self.process = subprocess.Popen([str(ROOT / ".venv/bin/gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("gunicorn did not start")

    def worker_rss_mb(self) -> float:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        total = 0
        for pid in children:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


def top1_labels(url: str, model: str, payloads: list[bytes], per_request: int = 16) -> list[str]:
    """Top-1 labels of many images, sent 16 per request."""
    labels = []
    for start in range(0, len(payloads), per_request):
        files = [("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(payloads[start:start + per_request])]
        answer = requests.post(f"{url}/v1/models/{model}/predict", files=files, timeout=300)
        answer.raise_for_status()
        labels.extend(p["label"] for p in answer.json()["predictions"])
    return labels


def predict(url: str, model: str, payload: bytes) -> dict:
    answer = requests.post(f"{url}/v1/models/{model}/predict", files={"image": ("x.jpg", payload, "image/jpeg")},
                           timeout=120)
    answer.raise_for_status()
    return answer.json()


def load(url: str, model: str, payloads: list[bytes], clients: int, seconds: float) -> dict:
    """N clients sending one image per request for `seconds`; images/s, p50 and p99 latency."""
    latencies: list[float] = []
    errors = []
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        i = index
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                predict(url, model, payloads[i % len(payloads)])
                latencies.append(time.perf_counter() - started)
            except requests.RequestException as exc:
                errors.append(str(exc))
            i += clients

    predict(url, model, payloads[0])  # warm: model loaded, functions traced
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"images_per_s": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "errors": len(errors),
            "requests": len(latencies)}


def raw_backbone(payloads: list[bytes], image_size: int, batch: int, seconds: float) -> float:
    """Images/s of the bare backbone's predict_on_batch at one batch size, preprocessed inputs."""
    import numpy as np

    from training.backbone import BackboneSpec, build_backbone
    from training.images import preprocess_image

    model = build_backbone(BackboneSpec("none", "avg", image_size)).model
    x = np.stack([preprocess_image(payloads[i % len(payloads)], image_size) for i in range(batch)])
    model.predict_on_batch(x)
    model.predict_on_batch(x)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict_on_batch(x)
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    from training.demo import write_digits_dataset
    from training.options import parse_options
    from training.pipeline import train
    from training.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = work / "digits"
    write_digits_dataset(data, image_size=args.image_size, per_class=24, classes=4)
    settings = Settings(model_dir=work / "models", data_dir=work / "data", backbone_weights="none")
    for index in range(20):  # 20 head-only models; after the first, features come from the cache
        epochs = 20 if index == 0 else 3
        train(data, f"m{index}", settings, parse_options({"image_size": args.image_size, "epochs": epochs}))
    payloads = jpeg_files(data, work / "jpeg", 96)
    # bfloat16 agreement is measured on more digits than the model was trained on.
    write_digits_dataset(work / "agreement", image_size=args.image_size, per_class=96, classes=4)
    agreement_payloads = jpeg_files(work / "agreement", work / "agreement-jpeg", 384)
    env = {"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir), "BACKBONE_WEIGHTS": "none",
           "MAX_BATCH_SIZE": "16", "MAX_BATCH_WAIT_MS": "5"}
    print(f"{args.image_size} px, {args.seconds:.0f} s per load level, 1 gunicorn worker (gthread)", flush=True)

    server = Server(env)
    try:
        results = {n: load(server.url, "m0", payloads, n, args.seconds) for n in (1, 4, 16)}
        float32_answers = top1_labels(server.url, "m0", agreement_payloads)
        rss_one = server.worker_rss_mb()
        for index in range(20):
            predict(server.url, f"m{index}", payloads[0])
        rss_twenty = server.worker_rss_mb()
        names = [f"m{i}" for i in range(10)]

        def many(models: list[str]) -> float:
            started = time.perf_counter()
            answer = requests.post(f"{server.url}/v1/predict", params={"models": ",".join(models)},
                                   files={"image": ("x.jpg", payloads[1], "image/jpeg")}, timeout=120)
            answer.raise_for_status()
            return time.perf_counter() - started

        many(names)
        one_model = statistics.median(many(names[:1]) for _ in range(7))
        ten_models = statistics.median(many(names) for _ in range(7))
    finally:
        server.stop()

    server = Server({**env, "SERVE_PRECISION": "bfloat16"})  # float32-trained heads on bfloat16 features
    try:
        bf16 = load(server.url, "m0", payloads, 16, args.seconds)
        bf16_answers = top1_labels(server.url, "m0", agreement_payloads)
    finally:
        server.stop()

    raw16 = raw_backbone(payloads, args.image_size, 16, args.seconds / 2)
    raw1 = 1 / raw_backbone(payloads, args.image_size, 1, args.seconds / 2)
    agreement = sum(a == b for a, b in zip(float32_answers, bf16_answers)) / len(agreement_payloads)

    print("\nclients  images/s    p50 ms    p99 ms  errors")
    for n, r in results.items():
        print(f"{n:7d}  {r['images_per_s']:8.2f}  {r['p50'] * 1000:8.0f}  {r['p99'] * 1000:8.0f}  {r['errors']:6d}")
    print(f"bf16 16  {bf16['images_per_s']:8.2f}  {bf16['p50'] * 1000:8.0f}  {bf16['p99'] * 1000:8.0f}  "
          f"{bf16['errors']:6d}")
    print(f"raw backbone: {raw16:.2f} images/s at batch 16, {raw1 * 1000:.0f} ms per batch-1 forward")
    print("\nratio                                         measured  target")
    print(f"service/raw throughput at N=16               {results[16]['images_per_s'] / raw16:8.2f}  >= 0.9")
    print(f"p50 at N=1 / raw batch-1 forward             {results[1]['p50'] / raw1:8.2f}  <= 1.3")
    print(f"bfloat16/float32 throughput at N=16          {bf16['images_per_s'] / results[16]['images_per_s']:8.2f}"
          "  >= 1.5")
    print(f"bfloat16 top-1 agreement                     {agreement:8.2%}  >= 99%   "
          f"({len(agreement_payloads)} images)")
    print(f"RSS 20 head models / 1 model                 {rss_twenty / rss_one:8.3f}  <= 1.1"
          f"   ({rss_one:.0f} MB -> {rss_twenty:.0f} MB)")
    print(f"one image, 10 models / 1 model               {ten_models / one_model:8.2f}  <= 1.2")


if __name__ == "__main__":
    main()
