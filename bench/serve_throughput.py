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
        env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "1"}
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

    def worker_cpu_s(self) -> float:
        """CPU seconds the worker process has used (all its threads)."""
        pid = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()[0]
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


_sessions = threading.local()


def session() -> requests.Session:
    """This thread's HTTP session: connections kept alive, as real clients keep them."""
    if not hasattr(_sessions, "value"):
        _sessions.value = requests.Session()
    return _sessions.value


def top1_labels(url: str, model: str, payloads: list[bytes], per_request: int = 16) -> list[str]:
    """Top-1 labels of many images, sent 16 per request."""
    labels = []
    for start in range(0, len(payloads), per_request):
        files = [("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(payloads[start:start + per_request])]
        answer = session().post(f"{url}/v1/models/{model}/predict", files=files, timeout=300)
        answer.raise_for_status()
        labels.extend(p["label"] for p in answer.json()["predictions"])
    return labels


def predict(url: str, model: str, payloads: list[bytes]) -> dict:
    files = [("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(payloads)]
    answer = session().post(f"{url}/v1/models/{model}/predict", files=files, timeout=300)
    answer.raise_for_status()
    return answer.json()


def load(server: Server, model: str, payloads: list[bytes], clients: int, seconds: float) -> dict:
    """N clients sending one image per request for `seconds`: images/s, p50 and p99 latency, CPU per image."""
    latencies: list[float] = []
    errors = []
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        i = index
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                predict(server.url, model, [payloads[i % len(payloads)]])
                latencies.append(time.perf_counter() - started)
            except requests.RequestException as exc:
                errors.append(str(exc))
            i += clients

    predict(server.url, model, payloads[:1])  # warm: model loaded, functions traced
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    worker_cpu, client_cpu, started = server.worker_cpu_s(), time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    worker_cpu, client_cpu = server.worker_cpu_s() - worker_cpu, time.process_time() - client_cpu
    latencies.sort()
    done = max(1, len(latencies))
    return {"images_per_s": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "errors": len(errors),
            "requests": len(latencies), "worker_cpu_per_image": worker_cpu / done,
            "client_cpu_per_image": client_cpu / done}


def small_behind_large(server: Server, model: str, payloads: list[bytes], seconds: float) -> dict:
    """One-image requests' latency while another client keeps sending 64-image requests."""
    stop = threading.Event()
    large_answers = []

    def large_client() -> None:
        while not stop.is_set():
            predict(server.url, model, (payloads * 2)[:64])
            large_answers.append(1)

    thread = threading.Thread(target=large_client)
    thread.start()
    time.sleep(1.0)  # the first large request is in its first batch
    latencies, stop_at = [], time.monotonic() + seconds
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            predict(server.url, model, payloads[:1])
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2], "max": latencies[-1], "requests": len(latencies),
            "large_requests": len(large_answers)}


class RawBackbone:
    """The bare backbone in this process: `predict_on_batch` on preprocessed inputs, the fastest plain call."""

    def __init__(self, payloads: list[bytes], image_size: int, precision: str = "float32") -> None:
        import numpy as np

        from training.backbone import BackboneSpec, build_backbone
        from training.images import preprocess_image

        self.model = build_backbone(BackboneSpec("none", "avg", image_size), precision=precision).model
        self.pixels = np.stack([preprocess_image(payloads[i % len(payloads)], image_size) for i in range(16)])
        self.model.predict_on_batch(self.pixels)

    def throughput(self, batch: int, seconds: float) -> dict:
        """Images/s and CPU seconds per image at one batch size."""
        x = self.pixels[:batch]
        self.model.predict_on_batch(x)
        done, cpu, started = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.model.predict_on_batch(x)
            done += batch
        return {"images_per_s": done / (time.perf_counter() - started),
                "cpu_per_image": (time.process_time() - cpu) / done}


def decode_ms(payloads: list[bytes], image_size: int) -> float:
    """Milliseconds of one thread to decode and preprocess one of the payloads."""
    from training.images import preprocess_image

    started = time.process_time()
    for payload in payloads:
        preprocess_image(payload, image_size)
    return (time.process_time() - started) / len(payloads) * 1000


def median(values) -> float:
    return statistics.median(list(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="service and raw backbone measured in turn, N times")
    args = parser.parse_args()

    from training.backbone import bfloat16_supported
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
    env = {"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir), "BACKBONE_WEIGHTS": "none"}
    bf16 = bfloat16_supported()
    print(f"{args.image_size} px, {args.seconds:.0f} s per load level, {args.rounds} rounds, 1 gunicorn worker "
          f"(gthread), the settings' defaults; native bfloat16: {'yes' if bf16 else 'no'}", flush=True)

    raw = RawBackbone(payloads, args.image_size)
    rounds = []
    server = Server(env)
    try:
        for index in range(args.rounds):  # in turn, so a slower spell of the shared machine hits both alike
            measured = {"raw16": raw.throughput(16, args.seconds / 2), "raw1": raw.throughput(1, args.seconds / 4),
                        16: load(server, "m0", payloads, 16, args.seconds),
                        1: load(server, "m0", payloads, 1, args.seconds / 2)}
            rounds.append(measured)
            print(f"round {index + 1}: service {measured[16]['images_per_s']:.2f} images/s at N=16, raw "
                  f"{measured['raw16']['images_per_s']:.2f}", flush=True)
        four = load(server, "m0", payloads, 4, args.seconds / 2)
        behind = small_behind_large(server, "m0", payloads, args.seconds * 3)
        float32_answers = top1_labels(server.url, "m0", agreement_payloads)
        rss_one = server.worker_rss_mb()
        for index in range(20):
            predict(server.url, f"m{index}", payloads[:1])
        rss_twenty = server.worker_rss_mb()
        names = [f"m{i}" for i in range(10)]

        def many(models: list[str]) -> float:
            started = time.perf_counter()
            answer = session().post(f"{server.url}/v1/predict", params={"models": ",".join(models)},
                                    files={"image": ("x.jpg", payloads[1], "image/jpeg")}, timeout=120)
            answer.raise_for_status()
            return time.perf_counter() - started

        many(names)
        one_model = median(many(names[:1]) for _ in range(7))
        ten_models = median(many(names) for _ in range(7))
    finally:
        server.stop()

    bf16_results = bfloat16_rounds(args, env, raw, payloads, agreement_payloads, float32_answers) if bf16 else None
    report(args, rounds, four, behind, bf16_results, rss_one, rss_twenty, one_model, ten_models,
           decode_ms(payloads, args.image_size), len(agreement_payloads))


def bfloat16_rounds(args, env: dict, raw_f32: RawBackbone, payloads: list[bytes], agreement_payloads: list[bytes],
                    float32_answers: list[str]) -> dict:
    """Float32-trained heads served on bfloat16 features, and the raw backbone in both precisions, in turn.

    Each round measures the service in bfloat16 and the raw backbone in bfloat16 and float32 side by side,
    so the served bfloat16 speed-up is compared with the raw one of the same spell of the shared machine.
    """
    raw_bf16 = RawBackbone(payloads, args.image_size, "bfloat16")
    server = Server({**env, "SERVE_PRECISION": "bfloat16"})
    rounds = []
    try:
        for index in range(args.rounds):
            measured = {"raw16": raw_bf16.throughput(16, args.seconds / 2)["images_per_s"],
                        "raw16_f32": raw_f32.throughput(16, args.seconds / 2)["images_per_s"],
                        "load": load(server, "m0", payloads, 16, args.seconds)}
            rounds.append(measured)
            print(f"bfloat16 round {index + 1}: service {measured['load']['images_per_s']:.2f} images/s at N=16, "
                  f"raw {measured['raw16']:.2f} (raw float32 {measured['raw16_f32']:.2f})", flush=True)
        bf16_answers = top1_labels(server.url, "m0", agreement_payloads)
    finally:
        server.stop()
    return {"rounds": rounds,
            "agreement": sum(a == b for a, b in zip(float32_answers, bf16_answers)) / len(bf16_answers)}


def report(args, rounds, four, behind, bf16, rss_one, rss_twenty, one_model, ten_models, decode, n_agreement) -> None:
    """Print the tables: load levels, where the CPU goes, and the ratios against the targets."""
    last = rounds[-1]
    print("\nclients  images/s    p50 ms    p99 ms  errors   (last round; N=4 once)")
    for n, r in ((1, last[1]), (4, four), (16, last[16])):
        print(f"{n:7d}  {r['images_per_s']:8.2f}  {r['p50'] * 1000:8.0f}  {r['p99'] * 1000:8.0f}  {r['errors']:6d}")
    raw16 = median(r["raw16"]["images_per_s"] for r in rounds)
    raw1_ms = median(1000 / r["raw1"]["images_per_s"] for r in rounds)
    print(f"raw backbone: {raw16:.2f} images/s at batch 16, {raw1_ms:.0f} ms per batch-1 forward (medians)")
    worker_cpu = median(r[16]["worker_cpu_per_image"] for r in rounds) * 1000
    client_cpu = median(r[16]["client_cpu_per_image"] for r in rounds) * 1000
    raw_cpu = median(r["raw16"]["cpu_per_image"] for r in rounds) * 1000
    print("\nwhere the CPU goes at N=16 (CPU ms per image, medians)")
    print(f"  raw backbone, batch 16                      {raw_cpu:8.1f}")
    print(f"  service worker (HTTP, decode, batcher, backbone, head) {worker_cpu:8.1f}  "
          f"({worker_cpu / raw_cpu - 1:+.1%} over raw)")
    print(f"    of which decoding + preprocessing (one thread)       {decode:8.1f}")
    print(f"  the load generator (requests, in the same 2 cores)     {client_cpu:8.1f}")

    ratios = [r[16]["images_per_s"] / r["raw16"]["images_per_s"] for r in rounds]
    latency = [r[1]["p50"] * r["raw1"]["images_per_s"] for r in rounds]
    from service.runtime import rows_per_forward
    from training.settings import Settings

    rows = rows_per_forward(Settings(), args.image_size)
    one_batch = rows / raw16  # the forward pass a large request's piece holds the backbone for
    print("\nratio                                         measured  target")
    print(f"service/raw throughput at N=16               {median(ratios):8.2f}  >= 0.95  "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"p50 at N=1 / raw batch-1 forward             {median(latency):8.2f}  <= 1.1   "
          f"(rounds: {', '.join(f'{x:.2f}' for x in latency)})")
    delay = (behind["p50"] - last[1]["p50"]) / one_batch
    print(f"1-image p50 behind 64-image requests, in batches of delay  {delay:5.2f}"
          f"  <= 1     (p50 {behind['p50'] * 1000:.0f} ms, max {behind['max'] * 1000:.0f} ms, alone "
          f"{last[1]['p50'] * 1000:.0f} ms, one batch of {rows} "
          f"{one_batch * 1000:.0f} ms; {behind['requests']} small, {behind['large_requests']} large)")
    if bf16 is None:
        print("bfloat16 serving                             not measured: this CPU has no native bfloat16 "
              "(no AVX512-BF16 or AMX), so the service computes float32")
    else:
        # served bf16/f32 over raw bf16/f32 = (served/raw in bfloat16) / (served/raw in float32), each side by side
        bf16_ratios = [r["load"]["images_per_s"] / r["raw16"] for r in bf16["rounds"]]
        raw_speedup = median(r["raw16"] / r["raw16_f32"] for r in bf16["rounds"])
        print(f"bfloat16 service/raw throughput at N=16      {median(bf16_ratios):8.2f}  "
              f"(rounds: {', '.join(f'{x:.2f}' for x in bf16_ratios)}; raw bfloat16/float32 {raw_speedup:.2f})")
        print(f"bfloat16/float32 served / raw ratio          {median(bf16_ratios) / median(ratios):8.2f}  >= 0.9   "
              f"(served {median(bf16_ratios) * raw_speedup / median(ratios):.2f}x, raw {raw_speedup:.2f}x)")
        print(f"bfloat16 top-1 agreement                     {bf16['agreement']:8.2%}  >= 99%   ({n_agreement} images)")
    print(f"RSS 20 head models / 1 model                 {rss_twenty / rss_one:8.3f}  <= 1.1"
          f"   ({rss_one:.0f} MB -> {rss_twenty:.0f} MB)")
    print(f"one image, 10 models / 1 model               {ten_models / one_model:8.2f}  <= 1.2")


if __name__ == "__main__":
    main()
