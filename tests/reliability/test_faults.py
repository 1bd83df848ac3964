"""Faults against a live stack: nothing is lost, nothing is done twice, no process crashes, no job is stuck.

The long runs (`@pytest.mark.long`, `make reliability`) each start the API under gunicorn, real
Celery workers and the reconciler (`python -m training.jobs reconcile --every 1 --lost-after 3`), cause
one fault, and record whether it was survived in the `faults` record: a worker SIGKILLed
mid-training, Redis killed and restarted with jobs queued (with AOF as the compose file ships it,
and without persistence), the API killed and restarted during a job, the model store's disk full
while a version is saved, and publish / roll back during load.
The short runs (in `make test`) fill a real small disk under the library and the model store.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback

import pytest
import requests

from tests.live import digits_zip
from tests.reliability.conftest import fill_disk, flush_shared_redis
from training.errors import StoreFullError
from training.jobs.records import JobStore
from training.jobs.runner import run_job
from training.settings import Settings
from training.store import ModelStore

SHORT_JOB = {"image_size": 32, "epochs": 3}
# Long enough that a fault lands while it trains (tens of seconds on two shared cores).
LONG_JOB = {"image_size": 32, "epochs": 200, "patience": 200}
# The space left on the model store's disk: less than one model file (a head is about 1 MB).
LEAVE_BYTES = 256 * 1024


def assert_disk_full_error(error: str | None) -> None:
    assert error and "disk full" in error and "No space left on device (ENOSPC)" in error, error


def store_entries(model_dir) -> list[str]:
    """Every path under the model store but the filler file: a failed save must leave none behind."""
    return sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.name != "filler.bin")


# --- short runs (make test) -------------------------------------------------------------------------------------


def test_disk_full_while_saving_fails_the_job_cleanly_and_the_next_one_succeeds(small_disk, tmp_path):
    from tests.training.jobs.helpers import add_dataset

    disk = small_disk(4096)
    settings = Settings(model_dir=disk, data_dir=tmp_path / "data", backbone_weights="none",
                        keras_home=tmp_path / "keras")
    dataset = add_dataset(settings)
    jobs = JobStore.from_settings(settings)
    try:
        filler = fill_disk(disk, LEAVE_BYTES)
        job = jobs.create("digits", dataset, SHORT_JOB)

        done = run_job(job["id"], settings, "test")

        assert done["status"] == "failed" and done["result"] is None, done
        assert_disk_full_error(done["error"])
        assert "'digits'" in done["error"] and "free space" in done["error"]
        assert ModelStore(disk).versions("digits") == [] and ModelStore(disk).names() == []
        assert store_entries(disk) == ["digits"], store_entries(disk)  # no staging folder, no partial file

        filler.unlink()
        again = run_job(jobs.create("digits", dataset, SHORT_JOB)["id"], settings, "test")
        assert again["status"] == "succeeded" and again["result"]["version"] == 1, again
        assert ModelStore(disk).versions("digits") == [1] and ModelStore(disk).published_version("digits") == 1
    finally:
        jobs.close()


def test_disk_full_when_publishing_takes_the_new_version_back(small_disk, monkeypatch):
    disk = small_disk(1024)
    store = ModelStore(disk)

    def write_model(folder):
        (folder / "head.keras").write_bytes(b"m" * 100_000)

    assert store.save_version("parts", write_model, {"metrics": {"accuracy": 0.5}}, ["a", "b"]) == (1, True)

    reserve = store._reserve_version

    def reserve_then_fill(name):
        version = reserve(name)
        fill_disk(disk, 0)  # the number is recorded; nothing is left for published.json
        return version

    monkeypatch.setattr(store, "_reserve_version", reserve_then_fill)
    with pytest.raises(StoreFullError, match=r"disk full: could not save a new version of 'parts'.*ENOSPC") as info:
        store.save_version("parts", write_model, {"metrics": {"accuracy": 0.9}}, ["a", "b"])
    failed_in = [frame.name for frame in traceback.extract_tb(info.value.__cause__.__traceback__)]
    assert "_write_published" in failed_in, failed_in  # after the rename into place, when publishing
    assert store.versions("parts") == [1] and store.published_version("parts") == 1
    assert not [p.name for p in (disk / "parts").iterdir() if p.name.startswith((".staging", ".deleting"))]

    fill_disk(disk, 0, "more-filler.bin")  # nothing left at all now
    with pytest.raises(StoreFullError, match="could not publish version 1 of 'parts'"):
        store.publish("parts", 1)
    assert store.published_version("parts") == 1


def test_disk_full_when_reserving_the_version_number_saves_nothing(small_disk):
    disk = small_disk(1024)
    store = ModelStore(disk)

    def write_model(folder):
        (folder / "head.keras").write_bytes(b"m" * 100_000)

    assert store.save_version("parts", write_model, {"metrics": {"accuracy": 0.5}}, ["a", "b"]) == (1, True)

    def write_model_then_fill(folder):
        write_model(folder)
        fill_disk(disk, 2 * os.sysconf("SC_PAGE_SIZE"))  # room for labels.json and metadata.json, not counter.json

    with pytest.raises(StoreFullError, match=r"disk full: could not save a new version of 'parts'.*ENOSPC") as info:
        store.save_version("parts", write_model_then_fill, {"metrics": {"accuracy": 0.9}}, ["a", "b"])
    failed_in = [frame.name for frame in traceback.extract_tb(info.value.__cause__.__traceback__)]
    assert "_reserve_version" in failed_in, failed_in  # before the rename: no number was handed out
    assert store.versions("parts") == [1] and store.published_version("parts") == 1
    assert not [p.name for p in (disk / "parts").iterdir() if p.name.startswith((".staging", ".deleting", ".counter"))]

    (disk / "filler.bin").unlink()
    assert store.save_version("parts", write_model, {"metrics": {"accuracy": 0.9}}, ["a", "b"]) == (2, True)


# --- long runs against a live stack (make reliability) ----------------------------------------------------------


@pytest.mark.long
def test_worker_sigkilled_mid_training(live_stack, fault_log, tmp_path):
    with fault_log.check("worker SIGKILLed mid-training") as outcome:
        stack = live_stack(flush_shared_redis())
        store = ModelStore(stack.settings.model_dir)
        dataset = stack.upload(digits_zip(tmp_path, per_class=40, classes=10))
        job_id = stack.train("digits", dataset, **LONG_JOB)
        deadline = time.monotonic() + 120
        while (job := stack.job(job_id))["progress"] is None or job["progress"]["phase"] != "head":
            assert time.monotonic() < deadline and job["status"] in ("queued", "running"), (job, stack.worker_logs())
            time.sleep(0.2)
        killed_at = job["progress"].get("epoch")
        first = stack.workers[0]
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool child, mid-epoch
        first.wait(10)
        first.killed = True
        stack.start_worker()
        most_versions = []

        (final,) = stack.wait([job_id], timeout=240, watch=lambda: most_versions.append(len(store.versions("digits"))))
        assert final["status"] == "succeeded", final  # re-run, or "failed" with a reason after 3 losses
        assert final["attempts"] == 2, final
        assert store.versions("digits") == [final["result"]["version"]] == [1]
        assert max(most_versions) <= 1
        assert stack.alive(), stack.worker_logs()
        outcome["detail"] = (f"killed in head training at epoch {killed_at}; requeued after the heartbeat went "
                             f"stale, re-run once (attempt 2) and succeeded; exactly one version")


@pytest.mark.long
@pytest.mark.parametrize("appendonly", [True, False], ids=["aof-everysec", "no-persistence"])
def test_redis_restarted_with_jobs_queued(appendonly, own_redis, live_stack, fault_log, tmp_path):
    name = f"Redis restarted with jobs queued ({'AOF everysec' if appendonly else 'no persistence'})"
    with fault_log.check(name) as outcome:
        redis_server = own_redis(appendonly)
        stack = live_stack(redis_server.url)
        dataset = stack.upload(digits_zip(tmp_path))
        running = stack.train("first", dataset, **{**LONG_JOB, "epochs": 150, "patience": 150})
        stack.wait([running], wanted=("running",), timeout=120)
        queued = [stack.train(model, dataset, **SHORT_JOB) for model in ("second", "third")]
        assert [stack.job(job_id)["status"] for job_id in queued] == ["queued", "queued"]
        # Messages in the broker: the waiting ones, and the running job's (kombu keeps a delivered,
        # unacknowledged message in its `unacked` hash until the job is done).
        before = redis_server.messages()
        assert before >= 3, before  # (more if the reconciler re-sent one meanwhile: harmless, a job runs once)
        time.sleep(1.5)  # appendfsync everysec: what was written more than a second ago is on disk

        redis_server.kill()
        down_at = time.monotonic()
        # While the broker is down a new job is recorded and answered 503 with Retry-After, not lost.
        status, answer = stack.api.json("/v1/models/fourth/train", {"dataset": dataset, **SHORT_JOB}, "POST")
        answered_s = time.monotonic() - down_at
        assert status == 503 and "broker" in answer["error"]["message"], (status, answer)
        status, listing = stack.api.json("/v1/jobs?status=queued")
        assert status == 200, listing
        late = [job["id"] for job in listing["jobs"] if job["model"] == "fourth"]
        assert len(late) == 1, listing
        redis_server.start()
        restarted = time.monotonic()
        # Counted at once, before the reconciler re-sends anything (it waits until a job is LOST_AFTER_S old).
        survived = redis_server.messages()
        if appendonly:
            assert survived == before, f"AOF lost messages: {survived} of {before} left"
        else:
            assert survived == 0, survived

        finals = stack.wait([running, *queued, *late], timeout=300)
        recovered_s = time.monotonic() - restarted
        assert [job["status"] for job in finals] == ["succeeded"] * 4, [(j["status"], j["error"]) for j in finals]
        assert [job["attempts"] for job in finals] == [1] * 4, [job["attempts"] for job in finals]
        store = ModelStore(stack.settings.model_dir)
        for model in ("first", "second", "third", "fourth"):
            assert store.versions(model) == [1], (model, store.versions(model))
        assert stack.alive(), stack.worker_logs()  # worker, API and reconciler lived through the outage
        outcome["detail"] = (f"Redis SIGKILLed for {restarted - down_at:.1f} s while one job trained and 2 waited; "
                             f"{survived} of {before} messages (waiting, and the running job's unacknowledged one) "
                             "survived the restart"
                             f"{'' if appendonly else ', the reconciler re-sent the lost ones'}"
                             f"; a job sent while Redis was down got 503 + Retry-After in {answered_s:.1f} s "
                             f"and ran after; all 4 succeeded once, one version each, {recovered_s:.0f} s after the "
                             "restart")


@pytest.mark.long
def test_reconciler_lives_through_a_long_broker_outage(own_redis, live_stack, fault_log, tmp_path):
    with fault_log.check("broker down longer than a reconciler round") as outcome:
        redis_server = own_redis(appendonly=True, start=False)  # its port is known; it starts later
        stack = live_stack(redis_server.url, workers=0)
        # Stored, queued for ingest, its message not sent: 503, and so is the train request (the job recorded).
        dataset = stack.api.upload(digits_zip(tmp_path), statuses=(503,))
        status, answer = stack.api.json("/v1/models/digits/train", {"dataset": dataset, **SHORT_JOB}, "POST")
        assert status == 503, answer  # recorded as queued, its message not sent
        # A round that cannot reach the broker fails after its retries (several seconds); it must be
        # logged and tried again, not end the reconciler.
        deadline = time.monotonic() + 60
        log = stack.reconciler.log_path
        while (failed := log.read_text(errors="replace").count("reconcile failed")) < 2:
            assert stack.reconciler.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        redis_server.start()
        stack.start_worker()
        status, listing = stack.api.json("/v1/jobs?status=queued")
        assert status == 200 and len(listing["jobs"]) == 1, listing
        (done,) = stack.wait([listing["jobs"][0]["id"]], timeout=180)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert ModelStore(stack.settings.model_dir).versions("digits") == [1]
        assert stack.api.json(f"/v1/datasets/{dataset}")[1]["status"] == "ready"
        assert stack.alive(), stack.worker_logs()
        outcome["detail"] = (f"Redis absent while a dataset was uploaded and a job waited: {failed} reconciler "
                             "rounds failed, were logged and retried; once Redis started the dataset was ingested "
                             "and the job sent, ran once and succeeded")


@pytest.mark.long
def test_api_restarted_during_a_job(live_stack, fault_log, tmp_path, digit_pngs):
    with fault_log.check("API killed and restarted during a job") as outcome:
        stack = live_stack(flush_shared_redis())
        dataset = stack.upload(digits_zip(tmp_path, per_class=40, classes=10))
        job_id = stack.train("digits", dataset, **{**LONG_JOB, "epochs": 60, "patience": 60})
        stack.wait([job_id], wanted=("running",), timeout=120)
        stack.api.stop(kill=True)  # SIGKILL to the gunicorn master; its workers go with the process group
        stack.api.start()
        assert stack.job(job_id)["status"] in ("running", "succeeded")
        (final,) = stack.wait([job_id], timeout=240)
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        assert ModelStore(stack.settings.model_dir).versions("digits") == [final["result"]["version"]] == [1]
        answer = requests.post(f"{stack.api.base}/v1/models/digits/predict",
                               files={"image": ("x.png", next(iter(digit_pngs.values())), "image/png")}, timeout=120)
        assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
        assert stack.alive(), stack.worker_logs()
        outcome["detail"] = ("gunicorn SIGKILLed while the job trained and started again; the job's status "
                             "stayed right, it finished once (attempt 1), the new API serves its version")


@pytest.mark.long
def test_disk_full_while_saving_a_version(live_stack, small_disk, fault_log, tmp_path):
    with fault_log.check("disk full while saving a version") as outcome:
        disk = small_disk(4096)
        stack = live_stack(flush_shared_redis(), model_dir=disk)
        dataset = stack.upload(digits_zip(tmp_path))
        filler = fill_disk(disk, LEAVE_BYTES)
        (failed,) = stack.wait([stack.train("digits", dataset, **SHORT_JOB)], timeout=180)
        assert failed["status"] == "failed", failed
        assert_disk_full_error(failed["error"])
        status, answer = stack.api.json("/v1/models/digits")
        assert status == 404, answer
        assert store_entries(disk) == ["digits"], store_entries(disk)
        assert stack.alive(), stack.worker_logs()  # the worker lived on

        filler.unlink()
        (done,) = stack.wait([stack.train("digits", dataset, **SHORT_JOB)], timeout=180)
        assert done["status"] == "succeeded" and done["result"]["version"] == 1, done
        status, answer = stack.api.json("/v1/models/digits")
        assert status == 200 and answer["published"] == 1 and len(answer["versions"]) == 1, answer
        reason = failed["error"].replace(f" in {disk}", "")
        outcome["detail"] = (f"model store on a full 4 MB tmpfs: the job failed with \"{reason}\"; no version "
                             "or staging file left, the worker lived on; after freeing space the next job made "
                             "version 1")


@pytest.mark.long
def test_publish_and_roll_back_during_load(two_versions, digit_pngs, fault_log, tmp_path):
    from tests.reliability.conftest import Gunicorn

    with fault_log.check("publish and roll back during load") as outcome:
        server = Gunicorn(two_versions, tmp_path / "gunicorn.log", WEB_CONCURRENCY="2", THREADS="8").start()
        images = list(digit_pngs.values())
        stop = threading.Event()
        answers: list[tuple[int, object]] = []

        def client(index: int) -> None:
            with requests.Session() as session:
                i = index
                while not stop.is_set():
                    response = session.post(f"{server.base}/v1/models/digits/predict",
                                            files={"image": ("x.png", images[i % len(images)], "image/png")},
                                            timeout=120)
                    answers.append((response.status_code, response.json().get("version")))
                    i += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        try:
            for thread in threads:
                thread.start()
            flips = []
            for flip in range(20):
                answer = requests.put(f"{server.base}/v1/models/digits/published", json={"version": 2 - flip % 2},
                                      timeout=60)
                flips.append(answer.status_code)
                time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
            alive = server.process.poll() is None
            server.stop()
        assert alive, "gunicorn died"
        assert flips == [200] * 20, flips
        assert answers and {status for status, _ in answers} == {200}, sorted({s for s, _ in answers})
        assert {version for _, version in answers} == {1, 2}, "both versions should have answered"
        outcome["detail"] = (f"{len(answers)} predictions from 8 clients on 2 gunicorn workers while the model "
                             "was published and rolled back 20 times: all 200, each from version 1 or 2")
