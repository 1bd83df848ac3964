"""A stack of several "hosts" on one machine that share only Redis, PostgreSQL and an S3-compatible store.

The S3-compatible store is moto's standalone server (`moto_server`, from the `moto[server]` package
on PyPI; not MinIO, whose binary is not on the package registries), started here on a free loopback
port and killed by the tests that take the store away. Redis is the machine's (database 9),
PostgreSQL the machine's (a fresh schema, dropped afterwards). Each host has its own MODEL_DIR and
DATA_DIR: two training workers (the first with the ingest worker beside it) and two API processes
under gunicorn. The training workers run with a test hook (`SLOW_UPLOADS`): while the flag file
exists, each model file they upload is followed by a wait, so a test can kill a worker, or the
store, in the middle of a version's upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.live import GUNICORN, ROOT, flush_redis, free_port, postgres_schema, server_env, wait_healthy, wait_job
from tests.training.jobs.helpers import stop_worker, worker_env
from training.jobs.app import INGEST_QUEUE, QUEUE
from training.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/9"
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
BUCKET = "classifier-test"
FINAL = ("succeeded", "failed", "cancelled")
# Test-only: after each model file a worker uploads, wait while the flag file exists.
SLOW_UPLOADS = (
    "import os, sys, time\n"
    "import training.objectstore as objectstore\n"
    "put_file = objectstore.S3Objects.put_file\n"
    "def slow_put_file(self, key, path):\n"
    "    put_file(self, key, path)\n"
    "    while key.startswith('models/') and os.path.exists(os.environ['SLOW_UPLOADS_FLAG']):\n"
    "        time.sleep(0.1)\n"
    "objectstore.S3Objects.put_file = slow_put_file\n"
    "from celery.__main__ import main\n"
    "sys.argv[0] = 'celery'\n"
    "sys.exit(main())\n")


class MotoServer:
    """moto's standalone S3-compatible server on a free loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.port, self.log_path = free_port(), log_path
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except (OSError, urllib.error.HTTPError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start:\n{self.log_path.read_text()[-2000:]}", pytrace=False)
                time.sleep(0.2)

    def client(self):
        """A boto3 client of this server (for the tests' own look at the bucket)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class Api:
    """One API host: gunicorn over its own folders."""

    def __init__(self, settings: Settings, log_path: Path, env: dict[str, str]) -> None:
        self.settings, self.log_path, self.env = settings, log_path, env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        env = server_env(self.settings, PORT=str(self.port), WEB_CONCURRENCY="1", **self.env)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                                            env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait(self) -> Api:
        wait_healthy(self.base, self.process, self.log_path, timeout=120)
        return self

    def call(self, path: str, body: dict | bytes | None = None, method: str | None = None,
             headers: dict | None = None) -> tuple[int, dict]:
        """Send a request; the status and the JSON answer, error statuses included."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json", **(headers or {})} if isinstance(body, dict) else headers
        request = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def upload(self, archive: bytes) -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + archive + f"\r\n--{boundary}--\r\n".encode()
        return self.call("/v1/datasets", body, "POST", {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclasses.dataclass
class Stack:
    """The hosts of one scale-out run and what they share."""

    folder: Path
    moto: MotoServer
    database_url: str
    store_url: str
    flag: Path
    apis: list[Api] = dataclasses.field(default_factory=list)
    workers: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """What every host is given: the broker, the job database, the store and its endpoint and key."""
        return {"CELERY_BROKER_URL": REDIS_URL, "DATABASE_URL": self.database_url, "STORE_URL": self.store_url,
                "AWS_ENDPOINT_URL": self.moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "STORE_TIMEOUT_S": "2", "PUBLISHED_TTL_S": "1", "SLOW_UPLOADS_FLAG": str(self.flag)}

    def settings(self, host: str) -> Settings:
        root = self.folder / host
        return Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=self.folder / "keras", database_url=self.database_url, store_url=self.store_url,
                        celery_broker_url=REDIS_URL, store_timeout_s=2)

    def start_worker(self, host: str, queue: str = QUEUE) -> subprocess.Popen:
        """A Celery worker of `queue` on `host` (its own folders), named after it."""
        name = f"{host}-{queue}"
        command = [sys.executable, "-c", SLOW_UPLOADS, "-A", "training.jobs.worker", "worker", "-Q", queue,
                   "--concurrency", "1", "--pool", "prefork", "-l", "info", "--without-gossip", "--without-mingle",
                   "--without-heartbeat", "-n", f"{name}@%h"]
        env = {**worker_env(self.settings(host), REDIS_URL), **self.env()}
        with (self.folder / f"{name}.log").open("wb") as log:
            self.workers[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
        return self.workers[name]

    def wait_workers(self, timeout: float = 120) -> None:
        """Wait until every worker says it is ready (consuming its queue)."""
        deadline = time.monotonic() + timeout
        for name, worker in self.workers.items():
            log = self.folder / f"{name}.log"
            while b" ready." not in log.read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"worker {name} did not start:\n{self.logs()}", pytrace=False)
                time.sleep(0.2)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker and its pool child (its own process group), as a host that loses power."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait(timeout=10)

    def worker_of(self, job_id: str) -> str:
        """The name of the worker that ran a job, from the job database (the API does not show it)."""
        from training.jobs.records import JobStore

        jobs = JobStore(self.database_url)
        try:
            return (jobs.get(job_id)["worker"] or "").split("@")[0]
        finally:
            jobs.close()

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.folder.glob("*.log"))]
        return "\n".join(parts)

    def wait_job(self, api: Api, job_id: str, timeout: float = 240) -> dict:
        return wait_job(api.call, job_id, FINAL, timeout, lambda: f"\n{self.logs()}")

    def objects(self, prefix: str) -> list[str]:
        """The keys under `prefix` of the run's store (below its own prefix)."""
        run_prefix = self.store_url.removeprefix(f"s3://{BUCKET}/")
        pages = self.moto.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                             Prefix=f"{run_prefix}/{prefix}")
        return sorted(item["Key"][len(run_prefix) + 1:] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Moto, then two API hosts and two worker hosts (one with the ingest worker), all started at once."""
    folder = tmp_path_factory.mktemp("scaleout")
    flush_redis(REDIS_URL)
    moto = MotoServer(folder / "moto.log").start()
    moto.client().create_bucket(Bucket=BUCKET)
    with postgres_schema("scaleout") as database_url, contextlib.ExitStack() as cleanup:
        cleanup.callback(moto.kill)
        run = Stack(folder, moto, database_url, f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}", folder / "slow-uploads")
        for host in ("api1", "api2"):
            api = Api(run.settings(host), folder / f"{host}.log", run.env()).start()
            run.apis.append(api)
            cleanup.callback(api.stop)
        for host, queue in (("gpu1", QUEUE), ("gpu1", INGEST_QUEUE), ("gpu2", QUEUE)):
            cleanup.callback(stop_worker, run.start_worker(host, queue))
        for api in run.apis:
            api.wait()
        run.wait_workers()
        yield run
