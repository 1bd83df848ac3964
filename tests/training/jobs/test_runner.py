"""A job's run (`run_job`), without a broker: recorded once, rerun safely, cancelled, fenced, failed clearly;
its dataset read from the manifest, ingested first when no worker did it yet, failed with the dataset's message."""

from __future__ import annotations

import pytest

from tests.training.jobs.helpers import DATASET_ID, PARAMS, add_dataset
from training.data import store as store_module
from training.data.store import DatasetStore
from training.errors import DatasetError
from training.jobs.records import JobStore
from training.jobs.runner import run_job
from training.store import ModelStore


def test_run_job_records_version_and_metrics_once(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "succeeded" and done["error"] is None, done
    assert done["result"]["version"] == 1 and done["result"]["published"] is True
    assert set(done["result"]["metrics"]) == {"accuracy", "top_k_accuracy", "loss"}
    assert done["progress"]["phase"] == "save" and done["worker"] == "test"
    store = ModelStore(settings.model_dir)
    assert store.versions("digits") == [1]
    assert store.metadata("digits", 1)["job"] == job["id"]
    # A redelivered message does nothing.
    assert run_job(job["id"], settings, "again") is None
    assert store.versions("digits") == [1]
    assert jobs.get(job["id"])["worker"] == "test"


def test_rerun_after_crash_reuses_the_saved_version(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    run_job(job["id"], settings, "first")
    # As if the worker died after saving but before recording: the job is back in the queue.
    with jobs.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET status='queued', result=NULL WHERE id=?", (job["id"],))

    done = run_job(job["id"], settings, "second")

    assert done["status"] == "succeeded" and done["result"]["version"] == 1
    assert ModelStore(settings.model_dir).versions("digits") == [1]


def write_head(folder):
    (folder / "head.keras").write_bytes(b"weights")


@pytest.mark.parametrize(("policy", "published_before", "published"), [
    ("auto", None, True),     # nothing published yet
    ("auto", 0.9, False),     # the published version is better
    ("auto", 0.4, True),      # as good or better than the published one
    ("always", 0.9, True),
    ("never", None, False),
])
def test_rerun_after_a_crash_between_rename_and_publish_applies_the_publish_policy(
        settings, jobs, policy, published_before, published):
    store = ModelStore(settings.model_dir)
    if published_before is not None:
        store.save_version("digits", write_head, {"metrics": {"accuracy": published_before}}, ["a", "b"], "always")
    job = jobs.create("digits", DATASET_ID, {**PARAMS, "publish": policy})
    # As if the first run renamed its version into place and died before publishing it.
    version, _ = store.save_version("digits", write_head, {"job": job["id"], "metrics": {"accuracy": 0.5}},
                                    ["a", "b"], "never")

    done = run_job(job["id"], settings, "second")

    assert done["status"] == "succeeded" and done["result"]["version"] == version
    assert done["result"]["published"] is published
    assert (store.published_version("digits") == version) is published
    assert store.versions("digits") == list(range(1, version + 1))  # no second version trained


def test_rerun_keeps_an_already_published_version_published(settings, jobs):
    store = ModelStore(settings.model_dir)
    job = jobs.create("digits", DATASET_ID, {**PARAMS, "publish": "never"})
    store.save_version("digits", write_head, {"job": job["id"], "metrics": {"accuracy": 0.5}}, ["a"], "always")

    done = run_job(job["id"], settings, "second")

    assert done["result"] == {"version": 1, "published": True,
                              "metrics": {"accuracy": 0.5, "top_k_accuracy": None, "loss": None}}
    assert store.published_version("digits") == 1


def test_cancel_before_start_runs_nothing(settings, jobs):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    jobs.request_cancel(job["id"])

    assert run_job(job["id"], settings, "test") is None
    assert jobs.get(job["id"])["status"] == "cancelled"
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_cancel_while_running_stops_without_a_version(settings, jobs, monkeypatch):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    heartbeat = JobStore.heartbeat

    def heartbeat_then_cancel(self, job_id, progress=None, attempt=None):
        alive = heartbeat(self, job_id, progress, attempt=attempt)
        if progress and progress["phase"] == "head":
            self.request_cancel(job_id)
        return alive

    monkeypatch.setattr(JobStore, "heartbeat", heartbeat_then_cancel)
    done = run_job(job["id"], settings, "test", cancel_poll_seconds=0)

    assert done["status"] == "cancelled" and done["result"] is None
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_a_frozen_run_that_wakes_after_being_requeued_saves_nothing(settings, jobs, monkeypatch):
    """A worker frozen past JOB_STALE_SECONDS (not dead) is requeued; when it wakes it must step aside."""
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    heartbeat = JobStore.heartbeat

    def heartbeat_then_lose_the_job(self, job_id, progress=None, attempt=None):
        alive = heartbeat(self, job_id, progress, attempt=attempt)
        if progress and progress["phase"] == "head" and attempt == 1:
            # Meanwhile the reconciler gave this run up and a second worker started the job.
            self.requeue(job_id)
            self.start(job_id, "second")
        return alive

    monkeypatch.setattr(JobStore, "heartbeat", heartbeat_then_lose_the_job)
    assert run_job(job["id"], settings, "frozen", cancel_poll_seconds=0) is None

    record = jobs.get(job["id"])
    assert record["status"] == "running" and record["worker"] == "second" and record["attempts"] == 2
    assert ModelStore(settings.model_dir).versions("digits") == []


@pytest.mark.parametrize(("dataset", "params", "message"), [
    ("ffffffffffffffff", PARAMS, "no dataset with id 'ffffffffffffffff'"),
    ("../etc", PARAMS, "dataset_id must be 16 lowercase hex characters"),
    (None, {"epochs": "many"}, "epochs must be a int, received: 'many'"),
    (None, {"colour": 1}, "unknown training option(s): colour"),
])
def test_bad_dataset_or_params_fail_with_a_clear_error(settings, jobs, dataset, params, message):
    stored = add_dataset(settings)
    job = jobs.create("digits", dataset or stored, params)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "failed" and message in done["error"], done["error"]
    assert ModelStore(settings.model_dir).versions("digits") == []


def test_unexpected_crash_is_recorded_not_raised(settings, jobs, monkeypatch):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    monkeypatch.setattr("training.pipeline.train", lambda *a, **k: 1 / 0)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "failed" and done["error"] == "internal error: ZeroDivisionError: division by zero"


def test_a_job_reads_its_dataset_from_the_manifest_without_decoding_it_again(settings, jobs, monkeypatch):
    job = jobs.create("digits", add_dataset(settings), PARAMS)
    # Only the ingest check decodes with `decode_image`; features decode through `preprocess_image`.
    monkeypatch.setattr("training.data.ingest.decode_image", lambda *a, **k: pytest.fail("decoded for a check"))

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "succeeded", done["error"]
    assert "ingest" not in done["progress"]["history"] and done["progress"]["phase"] == "save"


def test_a_job_ingests_a_dataset_no_worker_ingested_yet_as_its_first_phase(settings, jobs, monkeypatch):
    dataset = add_dataset(settings, ingest=False)
    job = jobs.create("digits", dataset, PARAMS)
    phases = []
    heartbeat = JobStore.heartbeat

    def record_phase(self, job_id, progress=None, attempt=None):
        if progress and (not phases or phases[-1] != progress["phase"]):
            phases.append(progress["phase"])
        return heartbeat(self, job_id, progress, attempt=attempt)

    monkeypatch.setattr(JobStore, "heartbeat", record_phase)
    done = run_job(job["id"], settings, "test")

    assert done["status"] == "succeeded", done["error"]
    assert phases[:2] == ["ingest", "features"]
    assert DatasetStore.from_settings(settings).get(dataset)["status"] == "ready"


def test_a_job_on_a_dataset_whose_ingest_fails_fails_with_the_datasets_message(settings, jobs, monkeypatch):
    dataset = add_dataset(settings, ingest=False)
    job = jobs.create("digits", dataset, PARAMS)

    def too_few(*args, **kwargs):
        raise DatasetError("class 'one' has 2 images; each class needs at least 5")

    monkeypatch.setattr(store_module, "ingest", too_few)

    done = run_job(job["id"], settings, "test")

    assert done["status"] == "failed"
    assert done["error"] == (f"dataset {dataset} cannot be trained on: class 'one' has 2 images; each class needs "
                             "at least 5")
    assert DatasetStore.from_settings(settings).get(dataset)["status"] == "failed"
    assert ModelStore(settings.model_dir).versions("digits") == []
