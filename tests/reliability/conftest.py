"""Live-stack fixtures for the reliability runs: gunicorn, Celery workers, Redis servers of our own, a small disk.

Everything here is a real process or a real filesystem: the service under gunicorn, Celery workers
on Redis, `redis-server` processes this suite starts (and kills and restarts; the machine's Redis on
6379 is only used through database 11), and a tmpfs mounted as the model store to fill it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.reliability import record
from tests.live import GUNICORN, ROOT, flush_redis, free_port, postgres_schema, server_env, wait_healthy
from tests.service.conftest import digit_pngs, trained_settings  # noqa: F401  (fixtures used here)
from tests.service.test_faults import Api as FaultsApi
from tests.training.jobs.helpers import start_ingest_worker, start_worker, stop_worker, worker_env
from training.settings import Settings

SHARED_REDIS_URL = "redis://127.0.0.1:6379/11"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
FINAL = ("succeeded", "failed", "cancelled")
# The reconciler re-sends a queued job whose message the broker lost once the job is this old
# (10 minutes by default; short here so a test sees it within its run).
LOST_AFTER_S = 3.0
RECONCILE_EVERY_S = 1.0


def flush_shared_redis() -> str:
    """Empty database 11 of the machine's Redis; fail (never skip) when it does not answer."""
    return flush_redis(SHARED_REDIS_URL)


class RedisServer:
    """A `redis-server` of this test's own on a free loopback port, to kill and restart at will."""

    def __init__(self, folder: Path, appendonly: bool) -> None:
        if not Path(REDIS_SERVER).is_file():
            pytest.fail(f"redis-server is not installed (looked for {REDIS_SERVER}); apt-get install redis-server",
                        pytrace=False)
        self.folder, self.appendonly = folder, appendonly
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # What the compose file ships (AOF, fsync every second), or no persistence at all.
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                   "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.ping():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def messages(self) -> int:
        """Messages the broker holds for the training queue: waiting, plus delivered and not yet acknowledged."""
        import redis

        from training.jobs.app import QUEUE

        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            return int(client.llen(QUEUE)) + int(client.hlen("unacked"))  # kombu's Redis transport keys
        finally:
            client.close()

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@pytest.fixture
def own_redis(tmp_path):
    """Start Redis servers of this test's own: `own_redis(appendonly=True)`; all are killed afterwards."""
    servers: list[RedisServer] = []

    def make(appendonly: bool, start: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", appendonly)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.kill()


class Gunicorn(FaultsApi):
    """`gunicorn -c gunicorn.conf.py wsgi:app` on a free loopback port, in its own process group."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        super().__init__(settings, None)
        self.env = env

    def start(self) -> Gunicorn:
        port = free_port()
        env = server_env(self.settings, PORT=str(port), **{"WEB_CONCURRENCY": "1", **self.env})
        if self.settings.celery_broker_url:
            env["CELERY_BROKER_URL"] = self.settings.celery_broker_url
        if self.settings.database_url:
            env["DATABASE_URL"] = self.settings.database_url
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        wait_healthy(self.base, self.process, self.log_path, timeout=90)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the master (TERM, or KILL as a crash would) and make sure its workers are gone too."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers orphaned by a killed master

    def rss_mb(self) -> float:
        """Resident memory of the master and all its workers, in MB."""
        import psutil

        master = psutil.Process(self.process.pid)
        total = 0
        for process in [master, *master.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total / 2**20


@dataclasses.dataclass
class Stack:
    """A live training stack as the Procfile starts it: the API under gunicorn, Celery training workers, an ingest
    worker, the reconciler and a broker, over one store and job DB."""

    settings: Settings
    folder: Path
    api: Gunicorn
    workers: list = dataclasses.field(default_factory=list)
    reconciler: subprocess.Popen | None = None
    ingest: subprocess.Popen | None = None

    def start_reconciler(self) -> subprocess.Popen:
        """`python -m training.jobs reconcile --every N` as the Procfile runs it, with a short lost-message age."""
        log = self.folder / "reconciler.log"
        with log.open("ab") as out:
            self.reconciler = subprocess.Popen(
                [sys.executable, "-m", "training.jobs", "reconcile", "--every", str(RECONCILE_EVERY_S),
                 "--lost-after", str(LOST_AFTER_S)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=worker_env(self.settings, self.settings.celery_broker_url), start_new_session=True)
        self.reconciler.log_path = log
        return self.reconciler

    def start_worker(self) -> subprocess.Popen:
        log = self.folder / f"worker-{len(self.workers)}.log"
        worker = start_worker(self.settings, self.settings.celery_broker_url, log)
        worker.log_path = log
        self.workers.append(worker)
        return worker

    def start_ingest_worker(self) -> subprocess.Popen:
        log = self.folder / "ingest.log"
        self.ingest = start_ingest_worker(self.settings, self.settings.celery_broker_url, log)
        self.ingest.log_path = log
        return self.ingest

    def upload(self, archive: bytes, timeout: float = 60) -> str:
        """Upload a dataset and wait until the ingest worker made it ready (so no ingest message is in flight)."""
        dataset_id = self.api.upload(archive)
        deadline = time.monotonic() + timeout
        while (record := self.api.json(f"/v1/datasets/{dataset_id}")[1])["status"] != "ready":
            if record["status"] == "failed" or time.monotonic() > deadline:
                pytest.fail(f"dataset {dataset_id} {record['status']}: {record.get('error')}\n{self.worker_logs()}",
                            pytrace=False)
            time.sleep(0.2)
        return dataset_id

    def worker_logs(self) -> str:
        processes = [*self.workers, *([self.ingest] if self.ingest else []),
                     *([self.reconciler] if self.reconciler else [])]
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-2500:]}"
                         for p in processes)

    def alive(self) -> bool:
        """Whether the API, every worker not killed on purpose, the ingest worker and the reconciler still run."""
        return (self.api.process.poll() is None and self.reconciler.poll() is None and self.ingest.poll() is None
                and all(worker.poll() is None for worker in self.workers if not getattr(worker, "killed", False)))

    def train(self, model: str, dataset: str, **params) -> str:
        status, answer = self.api.json(f"/v1/models/{model}/train", {"dataset": dataset, **params}, "POST")
        assert status == 202, answer
        return answer["job"]["id"]

    def job(self, job_id: str) -> dict:
        status, job = self.api.json(f"/v1/jobs/{job_id}")
        assert status == 200, job
        return job

    def wait(self, job_ids: list[str], wanted: tuple[str, ...] = FINAL, timeout: float = 180,
             watch=None) -> list[dict]:
        """Poll the jobs through the API until each is in `wanted`; fail naming them when they get stuck."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [self.job(job_id) for job_id in job_ids]
            if watch:
                watch()
            if all(job["status"] in wanted for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                pytest.fail(f"jobs stuck: {[(j['id'], j['status'], j['error']) for j in jobs]}\n"
                            f"{self.worker_logs()}", pytrace=False)
            time.sleep(0.3)

    def stop(self) -> None:
        if self.reconciler and self.reconciler.poll() is None:
            self.reconciler.terminate()
            try:
                self.reconciler.wait(30)
            except subprocess.TimeoutExpired:
                self.reconciler.kill()
                self.reconciler.wait(10)
        for worker in [*self.workers, *([self.ingest] if self.ingest else [])]:
            stop_worker(worker)
        self.api.stop()


@pytest.fixture
def live_stack(tmp_path):
    """Start a live stack (API, workers, ingest worker, reconciler): `live_stack(broker_url, model_dir=None)`;
    stopped afterwards."""
    stacks: list[Stack] = []
    schemas = contextlib.ExitStack()

    def make(broker_url: str, model_dir: Path | None = None, workers: int = 1) -> Stack:
        folder = tmp_path / f"stack-{len(stacks)}"
        folder.mkdir()
        data = folder / "data"
        # Job records in PostgreSQL, as docker-compose.yml deploys them (SQLite is covered by tests/service).
        database_url = schemas.enter_context(postgres_schema("reliability"))
        settings = Settings(model_dir=model_dir or folder / "models", data_dir=data, backbone_weights="none",
                            keras_home=folder / "keras", celery_broker_url=broker_url, database_url=database_url,
                            job_heartbeat_seconds=0.5, job_stale_seconds=5)
        stack = Stack(settings, folder, Gunicorn(settings, folder / "api.log",
                                                 JOB_HEARTBEAT_SECONDS="0.5", JOB_STALE_SECONDS="5"))
        stacks.append(stack)
        stack.api.start()
        for _ in range(workers):
            stack.start_worker()
        stack.start_ingest_worker()
        stack.start_reconciler()
        return stack

    yield make
    for stack in stacks:
        stack.stop()
    schemas.close()


@pytest.fixture
def two_versions(trained_settings, tmp_path):  # noqa: F811  (the imported fixture)
    """Settings over a private copy of the trained store with a second version to publish and roll back to."""
    models = tmp_path / "models"
    shutil.copytree(trained_settings.model_dir, models)
    shutil.copytree(models / "digits" / "1", models / "digits" / "2")
    return dataclasses.replace(trained_settings, model_dir=models)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a real tmpfs of `size_kb` (root needed; fails loudly otherwise); unmounted afterwards."""
    mounts: list[Path] = []

    def make(size_kb: int) -> Path:
        path = tmp_path / f"disk-{len(mounts)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "reliability-tmpfs",
                                 str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"cannot mount a {size_kb} KB tmpfs at {path} for the disk-full test (it needs root or "
                        f"CAP_SYS_ADMIN): {result.stderr.strip()}", pytrace=False)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach now, free when unused


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill_disk(path: Path, leave_bytes: int, name: str = "filler.bin") -> Path:
    """Fill the filesystem at `path` until only about `leave_bytes` are free; return the filler file."""
    filler = path / name
    size = max(0, free_bytes(path) - leave_bytes)
    with filler.open("wb") as handle:
        handle.write(b"\0" * size)
    return filler


class FaultLog:
    """Each fault test's outcome: survived, or lost with the failure's message."""

    def __init__(self) -> None:
        self.faults: list[dict] = []

    @contextlib.contextmanager
    def check(self, name: str):
        outcome = {"name": name, "survived": False, "detail": ""}
        try:
            yield outcome
        except BaseException as exc:
            outcome["detail"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            raise
        else:
            outcome["survived"] = True
        finally:
            self.faults.append(outcome)


@pytest.fixture(scope="session")
def fault_log():
    """Collect the fault runs' outcomes; written as the `faults` record at the end of the session."""
    log = FaultLog()
    yield log
    if log.faults:
        record("faults", {"faults": log.faults, "recorded": datetime.now(UTC).isoformat(timespec="seconds")})
