"""Objects every host shares: a tiny interface over a local folder or S3-compatible storage.

The shared stores (`training/shared_store.py`, `training/data/shared_store.py`,
`training/shared_features.py`) keep their files here under `STORE_URL`; `FolderObjects` is the same
interface over a folder (unit tests, or a folder every host mounts). Keys are `/`-separated paths
below the store's prefix. A put replaces one object whole (S3 has no partial writes), so a reader sees
the old or the new bytes, never a mix; nothing here renames, so the stores make a set of objects
visible by writing one small marker object last.

Every failure to reach the store (no connection, a timeout, a 5xx, missing credentials or bucket) is
one `StoreUnavailable` with a message that names the store: callers never see botocore's errors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from training.errors import StoreUnavailable
from training.settings import Settings, parse_store_url


class Objects(Protocol):
    """What the shared stores need of object storage."""

    url: str

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole."""

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file as one object."""

    def get_bytes(self, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""

    def get_file(self, key: str, path: Path) -> bool:
        """Download an object to `path` (written whole, then renamed); False when there is no such object."""

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix`, sorted."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many."""


def check_key(key: str) -> str:
    """Refuse a key that could leave the store's prefix or name a folder."""
    if not key or key.startswith("/") or key.endswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"key must be a relative path of non-empty parts, received: {key!r}")
    return key


class FolderObjects:
    """Objects as files under one folder; each put is a temporary file renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file as one object."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def get_file(self, key: str, path: Path) -> bool:
        """Copy an object to `path` (whole, then renamed); False when there is no such object."""
        source = self._path(key)
        if not source.is_file():
            return False
        with _atomic_target(path) as tmp:
            shutil.copyfile(source, tmp)
        return True

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix`, sorted (temporary files of puts in progress left out)."""
        base = self.root / prefix if prefix else self.root
        folder = base if prefix.endswith("/") or not prefix else base.parent
        if not folder.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in folder.rglob("*")
                if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        return sorted(key for key in keys if key.startswith(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many."""
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed onto it when the block succeeds and removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if tmp.exists():  # a block that wrote nothing (no such object) leaves `path` as it was
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Error codes S3 answers for a missing object or listing.
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Objects:
    """Objects in an S3-compatible bucket through boto3 (AWS S3, GCS's S3 API, MinIO, Ceph).

    boto3 reads the endpoint (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3), region and credentials
    itself, from the standard AWS settings and credential chain. The client is made on first use,
    once per process (a forked gunicorn or Celery child makes its own).
    """

    def __init__(self, bucket: str, prefix: str = "", timeout_s: float = 10.0) -> None:
        self.bucket, self.prefix, self.timeout_s = bucket, prefix.strip("/"), timeout_s
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: tuple[object, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 10.0) -> S3Objects:
        """Open `s3://bucket[/prefix]`."""
        bucket, prefix = parse_store_url(url)
        return cls(bucket, prefix, timeout_s)

    def _s3(self):
        """This process's boto3 client (clients are thread-safe; making one is not)."""
        with self._lock:
            if self._client is None or self._client[1] != os.getpid():
                import boto3
                from botocore.config import Config

                # Short timeouts and few retries: an unreachable store must become a clear 503 (or a
                # failed job) within seconds, not hang a request or a worker for minutes.
                config = Config(connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                                retries={"max_attempts": 2, "mode": "standard"})
                self._client = (boto3.session.Session().client("s3", config=config), os.getpid())
            return self._client[0]

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn boto3's failures into StoreUnavailable naming the store and what was being done."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise StoreUnavailable(f"object store {self.url} refused to {what}: {error.get('Code')}: "
                                   f"{error.get('Message') or exc}") from exc
        except BotoCoreError as exc:  # no connection, timeouts, no credentials
            raise StoreUnavailable(f"object store {self.url} is unreachable (could not {what}): {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole."""
        with self._errors(f"write {key}"):
            self._s3().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file as one object (multipart for large files: still visible only once whole)."""
        with self._errors(f"write {key}"):
            self._s3().upload_file(str(path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"):
            try:
                return self._s3().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in MISSING_CODES:
                    return None
                raise

    def get_file(self, key: str, path: Path) -> bool:
        """Download an object to `path` (whole, then renamed); False when there is no such object."""
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"), _atomic_target(path) as tmp:
            try:
                self._s3().download_file(self.bucket, self._key(key), str(tmp))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in MISSING_CODES:
                    return False
                raise
        return True

    def list(self, prefix: str) -> list[str]:
        """The keys under `prefix`, sorted."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors(f"list {prefix or '/'}"):
            for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][cut:] for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many."""
        keys = self.list(prefix)
        with self._errors(f"delete {prefix}"):
            for start in range(0, len(keys), 1000):  # S3 deletes at most 1000 keys a request
                batch = [{"Key": self._key(key)} for key in keys[start:start + 1000]]
                self._s3().delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def create_bucket(settings: Settings) -> bool:
    """Create STORE_URL's bucket if it is missing (MinIO in compose; on AWS or GCS, make it yourself); True if made."""
    from botocore.exceptions import ClientError

    objects = open_objects(settings)
    with objects._errors("create its bucket"):
        try:
            objects._s3().head_bucket(Bucket=objects.bucket)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in MISSING_CODES | {"NoSuchBucket"}:
                raise
        objects._s3().create_bucket(Bucket=objects.bucket)
    return True


def open_objects(settings: Settings) -> S3Objects:
    """The shared object store STORE_URL names."""
    if settings.store_url is None:
        raise ValueError("STORE_URL must be set to open the shared object store, received: None")
    return S3Objects.from_url(settings.store_url, settings.store_timeout_s)
