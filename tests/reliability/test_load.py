"""Load on the real service under gunicorn: held without errors, overload answered with quick 503s, flat memory.

The long run (`@pytest.mark.long`, `make reliability`) drives LOAD_CLIENTS (32) locust users for
LOAD_SECONDS (120) against two gunicorn workers while the model is published and rolled back every
second or two, samples the memory of the master and workers throughout, then bursts past a small
queue bound; it writes the `load` record. The short run (in `make test`) is the burst alone.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from bench.reliability import record
from tests.live import ROOT
from tests.reliability.conftest import Gunicorn

MODEL = "digits"
LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "120"))
LOAD_CLIENTS = int(os.environ.get("LOAD_CLIENTS", "32"))
LOCUST = Path(sys.executable).with_name("locust")
# Bounds for a shared 2-core machine: generous on time, strict on errors.
MAX_503_P99_MS = 2000.0
MAX_RSS_GROWTH = 0.10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def predict(session: requests.Session, base: str, image: bytes) -> requests.Response:
    return session.post(f"{base}/v1/models/{MODEL}/predict", files={"image": ("image.png", image, "image/png")},
                        timeout=60)


def overload_server(settings, folder: Path, threads: int) -> Gunicorn:
    """The service with a queue bound of one image and batches of one: a burst of clients overflows it."""
    return Gunicorn(settings, folder / "overload-gunicorn.log", THREADS=str(threads), MAX_QUEUE_IMAGES="1",
                    MAX_BATCH_SIZE="1", MAX_BATCH_WAIT_MS="0").start()


def overload_burst(base: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads posting back to back for `seconds`; counts per answer and 503 latencies."""
    answers: list[tuple[int, float, str | None]] = []
    failures: list[str] = []
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        with requests.Session() as session:
            i = index
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = predict(session, base, images[i % len(images)])
                except requests.RequestException as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                answers.append((response.status_code, time.perf_counter() - started,
                                response.headers.get("Retry-After")))
                if response.status_code not in (200, 503):
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                elif response.status_code == 503 and response.json()["error"]["code"] != "overloaded":
                    failures.append(f"503 that is not an overload: {response.text[:200]}")
                i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    rejected = [latency * 1000 for status, latency, _ in answers if status == 503]
    served = [latency * 1000 for status, latency, _ in answers if status == 200]
    return {"clients": clients, "duration_s": seconds, "requests": len(answers) + len(failures),
            "ok": len(served), "rejected_503": len(rejected), "other_errors": len(failures),
            "errors_seen": sorted(set(failures))[:5],
            "missing_retry_after": sum(1 for status, _, retry in answers if status == 503 and not retry),
            "p50_503_ms": round(percentile(rejected, 0.5), 1), "p99_503_ms": round(percentile(rejected, 0.99), 1),
            "p50_200_ms": round(percentile(served, 0.5), 1), "p99_200_ms": round(percentile(served, 0.99), 1)}


def run_overload(settings, folder: Path, images: list[bytes], clients: int = 32, seconds: float = 6.0) -> dict:
    """Burst past the queue bound, check the answers, then check the service is healthy again."""
    server = overload_server(settings, folder, clients)
    try:
        with requests.Session() as session:
            assert predict(session, server.base, images[0]).status_code == 200  # warm: backbone built, model loaded
            figures = overload_burst(server.base, images, clients, seconds)
            assert figures["other_errors"] == 0, figures
            assert figures["rejected_503"] > 0 and figures["ok"] > 0, figures
            assert figures["missing_retry_after"] == 0, figures
            assert figures["p99_503_ms"] < MAX_503_P99_MS, figures
            # After the burst: ready, and answering predictions again.
            assert session.get(f"{server.base}/readyz", timeout=30).status_code == 200
            answers = [predict(session, server.base, image).status_code for image in images]
            assert answers == [200] * len(images), answers
            assert server.process.poll() is None
    finally:
        server.stop()
    figures.pop("errors_seen")
    figures.pop("missing_retry_after")
    figures["healthy_after"] = True
    return figures


def test_a_burst_beyond_the_queue_bound_gets_quick_503s(trained_settings, digit_pngs, tmp_path):
    figures = run_overload(trained_settings, tmp_path, list(digit_pngs.values()))
    record("overload", figures)


# --- the long run ---------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Call `fn` every `interval` seconds until stopped; keep (seconds since start, value)."""

    def __init__(self, fn, interval: float) -> None:
        super().__init__(daemon=True)
        self.fn, self.interval = fn, interval
        self.samples: list[tuple[float, object]] = []
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic() - self.started_at, self.fn()))
            self.stopped.wait(self.interval)

    def stop(self) -> list[tuple[float, object]]:
        self.stopped.set()
        self.join(30)
        return self.samples


def locust_summary(prefix: Path) -> tuple[dict, list[str]]:
    """The aggregated row of locust's stats CSV, and its failure messages."""
    with open(f"{prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    failures_path = Path(f"{prefix}_failures.csv")
    failures = []
    if failures_path.exists():
        with failures_path.open(newline="") as handle:
            failures = [f"{row['Occurrences']}x {row['Error']}" for row in csv.DictReader(handle)]
    return rows["Aggregated"], failures


@pytest.mark.long
def test_load_is_held_with_publish_and_rollback_and_flat_memory(two_versions, digit_pngs, tmp_path):
    if not LOCUST.is_file():
        pytest.fail(f"locust is not installed in this environment ({LOCUST}): pip install locust", pytrace=False)
    images = list(digit_pngs.values())
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for label, data in digit_pngs.items():
        (image_dir / f"{label}.png").write_bytes(data)

    server = Gunicorn(two_versions, tmp_path / "gunicorn.log", WEB_CONCURRENCY="2", THREADS="16").start()
    try:
        # Warm both workers (backbone built, model loaded) before measuring anything.
        with ThreadPoolExecutor(16) as pool:
            warm = list(pool.map(lambda i: predict(requests.Session(), server.base, images[i % len(images)]),
                                 range(32)))
        assert {r.status_code for r in warm} == {200}

        publishes: list[int] = []

        def flip() -> int:
            version = 2 if len(publishes) % 2 == 0 else 1
            answer = requests.put(f"{server.base}/v1/models/{MODEL}/published", json={"version": version},
                                  timeout=60)
            publishes.append(answer.status_code)
            return answer.status_code

        memory = Sampler(server.rss_mb, 1.0)
        publisher = Sampler(flip, 1.5)
        prefix = tmp_path / "locust"
        env = {**os.environ, "LOAD_IMAGES": str(image_dir), "LOAD_MODEL": MODEL, "LOAD_VERSIONS": "1,2"}
        memory.start()
        publisher.start()
        try:
            locust = subprocess.run(
                [str(LOCUST), "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
                 "-u", str(LOAD_CLIENTS), "-r", str(LOAD_CLIENTS), "-t", f"{LOAD_SECONDS:.0f}s",
                 "--host", server.base, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
                 "--stop-timeout", "30"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=LOAD_SECONDS + 120)
        finally:
            samples = memory.stop()
            publisher.stop()
        assert server.process.poll() is None, "gunicorn died under load"
        stats, failures = locust_summary(prefix)
        requests_done, errors = int(stats["Request Count"]), int(stats["Failure Count"])
        assert requests_done > 0, locust.stdout[-3000:] + locust.stderr[-3000:]

        # Memory after warm-up (the first 15% of the run, at least 10 s) against the end of the run.
        warm_until = max(10.0, 0.15 * LOAD_SECONDS)
        settled = [value for at, value in samples if at >= warm_until] or [value for _, value in samples]
        rss_start, rss_end = settled[0], statistics.median(settled[-3:])
        figures = {
            "clients": LOAD_CLIENTS, "duration_s": LOAD_SECONDS, "requests": requests_done, "errors": errors,
            "error_rate": errors / requests_done, "p50_ms": float(stats["50%"]), "p99_ms": float(stats["99%"]),
            "rps": float(stats["Requests/s"]), "workers": 2, "threads": 16,
            "publishes": len(publishes), "publish_errors": sum(1 for s in publishes if s != 200),
            "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
            "rss_peak_mb": round(max(settled), 1), "rss_samples": len(samples),
            "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        assert errors == 0, (figures, failures[:5])
        assert figures["publishes"] >= 5 and figures["publish_errors"] == 0, (figures, publishes)
        assert rss_end <= rss_start * (1 + MAX_RSS_GROWTH), figures
    finally:
        server.stop()

    figures["overload"] = run_overload(two_versions, tmp_path, images, clients=LOAD_CLIENTS, seconds=8.0)
    record("load", figures)
