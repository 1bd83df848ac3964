"""Prometheus metrics: request counts and latencies per endpoint, and the runtime's own metrics.

Under gunicorn each worker is a process, so the metrics use prometheus-client's
multiprocess mode: `gunicorn.conf.py` sets `PROMETHEUS_MULTIPROC_DIR` before any worker
imports prometheus_client, and `/metrics` then adds up the files of every worker.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.auth import PUBLIC, role

REQUESTS = Counter("classifier_http_requests_total", "HTTP requests answered, by URL rule, method and status",
                   ["endpoint", "method", "status"])
LATENCY = Histogram("classifier_http_request_duration_seconds", "Time to answer an HTTP request, by endpoint",
                    ["endpoint", "method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# Updated by the prediction runtime (service/runtime.py).
BATCH_SIZE = Histogram("classifier_batch_size", "Images per backbone batch run by the prediction runtime",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_DEPTH = Gauge("classifier_queue_depth", "Images waiting in the prediction queue", multiprocess_mode="livesum")
MODEL_LOADS = Counter("classifier_model_loads_total", "Model versions loaded into memory", ["model"])
MODEL_MEMORY = Gauge("classifier_model_memory_bytes", "Weight bytes of the models and backbones held in memory "
                     "(bounded by MAX_MODEL_MEMORY_MB)", multiprocess_mode="livesum")
LOADED_MODELS = Gauge("classifier_loaded_models", "Models and backbones held in memory", multiprocess_mode="livesum")


def record_batch(batch_rows: int, queued_rows: int) -> None:
    """Observe one forward pass of the prediction runtime."""
    BATCH_SIZE.observe(batch_rows)
    QUEUE_DEPTH.set(queued_rows)


def record_load(name: str) -> None:
    """Count a model version loaded into memory."""
    MODEL_LOADS.labels(name).inc()


def record_memory(entries: int, nbytes: int) -> None:
    """Set what the runtime's model cache holds."""
    LOADED_MODELS.set(entries)
    MODEL_MEMORY.set(nbytes)


def registry() -> CollectorRegistry:
    """The registry to expose: every worker's files in multiprocess mode, else this process's."""
    try:
        collected = CollectorRegistry()
        # prometheus_client reads PROMETHEUS_MULTIPROC_DIR itself; without it this raises ValueError.
        MultiProcessCollector(collected)
        return collected
    except ValueError:
        return REGISTRY


def endpoint_label() -> str:
    """The URL rule that matched (bounded label values), not the raw path."""
    return request.url_rule.rule if request.url_rule else "unmatched"


def start_timer() -> None:
    """Note when the request started."""
    g.metrics_started = time.perf_counter()


def record(response: Response) -> Response:
    """Count the request and observe its latency."""
    endpoint = endpoint_label()
    elapsed = time.perf_counter() - g.get("metrics_started", time.perf_counter())
    REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
    LATENCY.labels(endpoint, request.method).observe(elapsed)
    return response


@role(PUBLIC)
def metrics_view() -> Response:
    """Expose the metrics in Prometheus' text format."""
    return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Record every request and serve GET /metrics (register before any hook that may answer early)."""
    app.before_request(start_timer)
    app.after_request(record)
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
