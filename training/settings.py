"""The one typed settings object, read from the environment once.

Nothing else in the project reads `os.environ`; code takes a `Settings` (or the
values it needs) as an argument, so tests build their own without touching the
environment. Every name here is documented in `.env.example`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

PRECISIONS = ("float32", "bfloat16")
# SERVE_PRECISION: `trained` serves each version in the precision its metrics were computed in.
SERVE_PRECISIONS = ("trained", *PRECISIONS)
PAD_BATCHES = ("auto", "on", "off")


# STORE_URL: s3://bucket or s3://bucket/prefix (bucket names as S3 allows them: 3-63 characters).
STORE_URL_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9!_.*'()/-]*)?$")


def parse_store_url(url: str) -> tuple[str, str]:
    """Split STORE_URL `s3://bucket[/prefix]` into (bucket, prefix without slashes at either end)."""
    match = STORE_URL_PATTERN.match(url) if isinstance(url, str) else None
    if match is None:
        raise ValueError(f"STORE_URL must be unset or s3://bucket[/prefix], received: {url!r}")
    return match.group(1), (match.group(2) or "").strip("/")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Service and library settings; see `.env.example` for each one."""

    model_dir: Path = Path("models")
    data_dir: Path = Path("data")
    backbone_weights: str = "imagenet"
    keras_home: Path = Path("~/.keras").expanduser()
    celery_broker_url: str | None = None
    database_url: str | None = None
    training_api_key: str | None = None
    prediction_api_key: str | None = None
    max_upload_mb: int = 512
    # Prediction request bodies have their own, smaller limit.
    max_predict_mb: int = 32
    # The precision training computes features (and fine-tunes) in, recorded with each version;
    # serving runs a version in that precision unless SERVE_PRECISION says otherwise.
    precision: str = "float32"
    serve_precision: str = "trained"
    # Ingest limits: an archive over any of them is rejected while it streams.
    max_archive_entries: int = 100_000
    max_archive_mb: int = 4096
    max_compression_ratio: int = 200
    max_image_pixels: int = 50_000_000
    min_images_per_class: int = 5
    # Serving: where gunicorn binds, how many processes and threads, micro-batching.
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 1
    threads: int = 8
    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    max_queue_images: int = 256
    # Pad each forward pass to a power of two (or MAX_BATCH_SIZE): on, off, or auto (on under JAX, whose
    # compiler specialises on the batch shape).
    pad_batches: str = "auto"
    # One forward pass holds at most this many image pixels (images x side x side): 32 images of
    # 224 px, or one of 1024 px, so large images cannot allocate gigabytes at once.
    max_batch_pixels: int = 32 * 224 * 224
    # A prediction waiting longer than this for its forward pass gives up (503 + Retry-After).
    predict_timeout_s: float = 30.0
    # Models (backbones, fine-tuned models, heads) a serving process keeps loaded, by weight bytes.
    max_model_memory_mb: int = 2048
    # Training jobs: a running job's worker reports every JOB_HEARTBEAT_SECONDS; one silent
    # for JOB_STALE_SECONDS is taken as lost and requeued by the reconciler.
    job_heartbeat_seconds: float = 15.0
    job_stale_seconds: float = 90.0
    # A running job still going this long after its cancel request is killed by the reconciler.
    job_cancel_grace_seconds: float = 60.0
    # Job event streams (server-sent events): each open one holds a server thread, so a process serves
    # at most EVENT_STREAMS at once (None: THREADS // 2); a stream reads its job every EVENTS_POLL_S,
    # says it is alive every EVENTS_KEEPALIVE_S when idle, and ends after EVENTS_LIFETIME_S (a
    # forgotten client must not hold a thread forever).
    event_streams: int | None = None
    events_poll_s: float = 0.5
    events_keepalive_s: float = 15.0
    events_lifetime_s: float = 3600.0
    # prometheus-client's multiprocess folder (its own variable, PROMETHEUS_MULTIPROC_DIR); None: gunicorn's
    # config makes a temporary one and sets the variable for its workers.
    metrics_dir: Path | None = None
    # Storage every host shares (training/objectstore.py): None keeps everything in the local folders;
    # `s3://bucket[/prefix]` puts datasets, model versions and features in S3-compatible object storage
    # (endpoint, region and credentials: boto3's own AWS_* settings). Then MODEL_DIR and DATA_DIR hold
    # this host's copies, each bounded: MODEL_CACHE_MB of downloaded versions, FEATURE_CACHE_MB of
    # downloaded feature shards.
    store_url: str | None = None
    store_timeout_s: float = 10.0
    model_cache_mb: int = 10240
    feature_cache_mb: int = 20480
    # How long an API process trusts what it last read of a model's versions and published version (the
    # job database): a publish on one replica is seen by the others within this many seconds.
    published_ttl_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.job_heartbeat_seconds < self.job_stale_seconds:
            raise ValueError("JOB_HEARTBEAT_SECONDS must be above 0 and below JOB_STALE_SECONDS, received: "
                             f"{self.job_heartbeat_seconds} and {self.job_stale_seconds}")
        if not self.job_cancel_grace_seconds > 0:
            raise ValueError(f"JOB_CANCEL_GRACE_SECONDS must be above 0, received: {self.job_cancel_grace_seconds}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PRECISION must be one of {PRECISIONS}, received: {self.precision!r}")
        if self.serve_precision not in SERVE_PRECISIONS:
            raise ValueError(f"SERVE_PRECISION must be one of {SERVE_PRECISIONS}, received: {self.serve_precision!r}")
        if self.pad_batches not in PAD_BATCHES:
            raise ValueError(f"PAD_BATCHES must be one of {PAD_BATCHES}, received: {self.pad_batches!r}")
        if not self.predict_timeout_s > 0:
            raise ValueError(f"PREDICT_TIMEOUT_S must be above 0, received: {self.predict_timeout_s}")
        for name in ("events_poll_s", "events_keepalive_s", "events_lifetime_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.upper()} must be above 0, received: {getattr(self, name)}")
        if self.store_url is not None:
            parse_store_url(self.store_url)
        for name in ("store_timeout_s", "published_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.upper()} must be above 0, received: {getattr(self, name)}")
        if self.event_streams is not None and self.event_streams < 1:
            raise ValueError(f"EVENT_STREAMS must be at least 1, received: {self.event_streams}")
        for name in ("max_upload_mb", "max_predict_mb", "max_batch_pixels", "max_model_memory_mb",
                     "max_archive_entries", "max_archive_mb",
                     "max_compression_ratio", "max_image_pixels", "min_images_per_class", "port",
                     "web_concurrency", "threads", "max_batch_size", "max_queue_images",
                     "model_cache_mb", "feature_cache_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1, received: {getattr(self, name)}")

    @property
    def feature_cache_dir(self) -> Path:
        """Folder of cached backbone features."""
        return self.data_dir / "features"

    @property
    def shared(self) -> bool:
        """Whether datasets, model versions and features live in storage several hosts share (STORE_URL)."""
        return self.store_url is not None

    @property
    def database(self) -> str:
        """The job database's URL: DATABASE_URL, or SQLite under DATA_DIR."""
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.sqlite3'}"

    @property
    def datasets_dir(self) -> Path:
        """Folder of ingested datasets."""
        return self.data_dir / "datasets"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from an environment mapping (default: the process environment)."""
        env = os.environ if environ is None else environ

        def text(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: int, kind: type = int):
            raw = text(name, None)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise ValueError(f"{name} must be {what}, received: {raw!r}") from None

        defaults = cls()
        return cls(
            model_dir=Path(text("MODEL_DIR", str(defaults.model_dir))),
            data_dir=Path(text("DATA_DIR", str(defaults.data_dir))),
            backbone_weights=text("BACKBONE_WEIGHTS", defaults.backbone_weights),
            keras_home=Path(text("KERAS_HOME", str(defaults.keras_home))).expanduser(),
            celery_broker_url=text("CELERY_BROKER_URL", None),
            database_url=text("DATABASE_URL", None),
            training_api_key=text("TRAINING_API_KEY", None),
            prediction_api_key=text("PREDICTION_API_KEY", None),
            max_upload_mb=number("MAX_UPLOAD_MB", defaults.max_upload_mb),
            max_predict_mb=number("MAX_PREDICT_MB", defaults.max_predict_mb),
            precision=text("PRECISION", defaults.precision),
            serve_precision=text("SERVE_PRECISION", defaults.serve_precision),
            max_archive_entries=number("MAX_ARCHIVE_ENTRIES", defaults.max_archive_entries),
            max_archive_mb=number("MAX_ARCHIVE_MB", defaults.max_archive_mb),
            max_compression_ratio=number("MAX_COMPRESSION_RATIO", defaults.max_compression_ratio),
            max_image_pixels=number("MAX_IMAGE_PIXELS", defaults.max_image_pixels),
            min_images_per_class=number("MIN_IMAGES_PER_CLASS", defaults.min_images_per_class),
            host=text("HOST", defaults.host),
            port=number("PORT", defaults.port),
            web_concurrency=number("WEB_CONCURRENCY", defaults.web_concurrency),
            threads=number("THREADS", defaults.threads),
            max_batch_size=number("MAX_BATCH_SIZE", defaults.max_batch_size),
            max_batch_wait_ms=number("MAX_BATCH_WAIT_MS", defaults.max_batch_wait_ms, float),
            max_queue_images=number("MAX_QUEUE_IMAGES", defaults.max_queue_images),
            pad_batches=text("PAD_BATCHES", defaults.pad_batches),
            max_batch_pixels=number("MAX_BATCH_PIXELS", defaults.max_batch_pixels),
            predict_timeout_s=number("PREDICT_TIMEOUT_S", defaults.predict_timeout_s, float),
            max_model_memory_mb=number("MAX_MODEL_MEMORY_MB", defaults.max_model_memory_mb),
            job_heartbeat_seconds=number("JOB_HEARTBEAT_SECONDS", defaults.job_heartbeat_seconds, float),
            job_stale_seconds=number("JOB_STALE_SECONDS", defaults.job_stale_seconds, float),
            job_cancel_grace_seconds=number("JOB_CANCEL_GRACE_SECONDS", defaults.job_cancel_grace_seconds, float),
            event_streams=number("EVENT_STREAMS", defaults.event_streams),
            events_poll_s=number("EVENTS_POLL_S", defaults.events_poll_s, float),
            events_keepalive_s=number("EVENTS_KEEPALIVE_S", defaults.events_keepalive_s, float),
            events_lifetime_s=number("EVENTS_LIFETIME_S", defaults.events_lifetime_s, float),
            metrics_dir=Path(folder) if (folder := text("PROMETHEUS_MULTIPROC_DIR", None)) else None,
            store_url=text("STORE_URL", None),
            store_timeout_s=number("STORE_TIMEOUT_S", defaults.store_timeout_s, float),
            model_cache_mb=number("MODEL_CACHE_MB", defaults.model_cache_mb),
            feature_cache_mb=number("FEATURE_CACHE_MB", defaults.feature_cache_mb),
            published_ttl_s=number("PUBLISHED_TTL_S", defaults.published_ttl_s, float),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings.from_env()
