"""Issue 15: several hosts that share only Redis, PostgreSQL and object storage (moto's S3 server here).

In order, on one stack (conftest.py): a dataset uploaded on one API is ingested and trained on by
the workers (two versions at once, one on each worker host) and served by the other API with the
answers its recorded metrics were computed from; a publish and a roll back on either API reach both
within seconds; a worker killed in the middle of a version's upload leaves no version anyone sees;
and with the store gone, the APIs answer 503 with a clear message where they need it, serve what
they cached, and a job fails with a clear message without leaving a version behind.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile

import numpy as np
import pytest

from tests.live import multipart
from training.demo import write_digits_dataset
from training.shared_store import SharedModelStore

MODEL = "scaled"
PER_CLASS, VAL_PER_CLASS, CLASSES = 14, 4, 4
OPTIONS = {"image_size": 32, "epochs": 12}
# Within this long of a publish on one API, the other answers with it (PUBLISHED_TTL_S is 1 s here).
PUBLISH_SEEN_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits at 32 px as `train/<label>/` and `val/<label>/` folders, and their zip."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_dataset(root / "all", image_size=32, per_class=PER_CLASS, classes=CLASSES)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label_dir in sorted((root / "all").iterdir()):
            images = sorted(label_dir.glob("*.png"))
            for split, chosen in (("val", images[:VAL_PER_CLASS]), ("train", images[VAL_PER_CLASS:])):
                (root / split / label_dir.name).mkdir(parents=True)
                for image in chosen:
                    shutil.copy(image, root / split / label_dir.name / image.name)
                    archive.write(image, f"{split}/{label_dir.name}/{image.name}")
    return root / "val", buffer.getvalue()


def served_confusion(api, val_dir, classes: list[str], version: int) -> list[list[int]]:
    """The confusion matrix of an API's answers for every validation image of `version`."""
    images = sorted(val_dir.glob("*/*.png"))
    body, content_type = multipart("image", [path.read_bytes() for path in images])
    status, answer = api.call(f"/v1/models/{MODEL}/predict?version={version}", body, "POST",
                              {"Content-Type": content_type})
    assert status == 200, answer
    matrix = np.zeros((len(classes), len(classes)), int)
    for path, prediction in zip(images, answer["predictions"]):
        matrix[classes.index(path.parent.name), classes.index(prediction["label"])] += 1
    return matrix.tolist()


def published_answer(api, val_dir) -> int:
    """The version an API answers with when none is asked for."""
    body, content_type = multipart("image", [next(val_dir.glob("*/*.png")).read_bytes()])
    status, answer = api.call(f"/v1/models/{MODEL}/predict", body, "POST", {"Content-Type": content_type})
    assert status == 200, answer
    return answer["version"]


def wait_published(apis, val_dir, version: int) -> float:
    """Seconds until every API answers with `version`; fails after PUBLISH_SEEN_WITHIN_S."""
    start = time.monotonic()
    while {published_answer(api, val_dir) for api in apis} != {version}:
        assert time.monotonic() - start < PUBLISH_SEEN_WITHIN_S, f"version {version} not served by every API"
        time.sleep(0.2)
    return time.monotonic() - start


def train(api, dataset_id: str, **options) -> str:
    status, answer = api.call(f"/v1/models/{MODEL}/train", {"dataset": dataset_id, **OPTIONS, **options}, "POST")
    assert status == 202, answer
    return answer["job"]["id"]


def wait_uploading(stack, version: int, timeout: float = 240) -> None:
    """Wait until a worker put the first file of `version` in the store (the slow-upload hook holds the rest)."""
    deadline = time.monotonic() + timeout
    while not stack.objects(f"models/{MODEL}/{version}/"):
        assert time.monotonic() < deadline, f"version {version} never started uploading:\n{stack.logs()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained(stack, digits):
    """A dataset uploaded on API 1 and two versions trained at once, one on each worker: (dataset id, jobs,
    the version published, the other); which job got which number is up to the race."""
    api1, api2 = stack.apis
    status, record = api1.upload(digits[1])
    assert status == 202, record
    first, second = train(api1, record["id"]), train(api1, record["id"], publish="never")
    jobs = [stack.wait_job(api2, job_id) for job_id in (first, second)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], (jobs, stack.logs())
    return record["id"], jobs, jobs[0]["result"]["version"], jobs[1]["result"]["version"]


def test_upload_on_one_api_train_on_the_workers_serve_on_the_other(stack, digits, trained):
    api1, api2 = stack.apis
    dataset_id, jobs, published, _ = trained
    status, dataset = api2.call(f"/v1/datasets/{dataset_id}")
    assert status == 200 and dataset["status"] == "ready" and len(dataset["classes"]) == CLASSES, dataset
    assert sorted(job["result"]["version"] for job in jobs) == [1, 2]
    # Each worker host took one of the two jobs: both publish to the one store.
    assert {stack.worker_of(job["id"]) for job in jobs} == {"gpu1-training", "gpu2-training"}, jobs
    status, model = api2.call(f"/v1/models/{MODEL}")
    assert status == 200 and model["published"] == published and [v["version"] for v in model["versions"]] == [1, 2]
    for api in stack.apis:  # served = evaluated, on both APIs, for the versions either worker made
        for version in model["versions"]:
            served = served_confusion(api, digits[0], version["classes"], version["version"])
            assert served == version["metrics"]["confusion_matrix"], (api.base, version["version"])
    # The features the workers computed are in the store, shard by shard (rows, then the keys that show them).
    shards = stack.objects("features/")
    assert shards and {key[:-5] for key in shards if key.endswith(".keys")} == \
        {key[:-4] for key in shards if key.endswith(".npy")}
    # Each host downloaded each version once, into its content-addressed cache (a folder per digest).
    for host in ("api1", "api2"):
        assert len(list((stack.folder / host / "models" / ".cache").glob("[0-9a-f]*"))) == 2


def test_publish_and_roll_back_reach_every_api_within_seconds(stack, digits, trained):
    api1, api2 = stack.apis
    _, _, published, other = trained
    wait_published(stack.apis, digits[0], published)
    status, answer = api1.call(f"/v1/models/{MODEL}/published", {"version": other}, "PUT")
    assert status == 200, answer
    assert published_answer(api1, digits[0]) == other  # the API that published sees it at once
    wait_published(stack.apis, digits[0], other)
    status, answer = api2.call(f"/v1/models/{MODEL}/published", {"version": published}, "PUT")  # roll back
    assert status == 200, answer
    wait_published(stack.apis, digits[0], published)


def test_a_worker_killed_mid_upload_leaves_no_version(stack, digits, trained, monkeypatch):
    api1, api2 = stack.apis
    dataset_id, _, published, _ = trained
    stack.flag.touch()
    try:
        job_id = train(api1, dataset_id, publish="always")
        wait_uploading(stack, 3)
        status, job = api1.call(f"/v1/jobs/{job_id}")
        assert job["status"] == "running", job
        stack.kill_worker(stack.worker_of(job_id))
    finally:
        stack.flag.unlink()
    uploaded = stack.objects(f"models/{MODEL}/3/")
    assert uploaded and f"models/{MODEL}/3/COMPLETE" not in uploaded
    for api in stack.apis:
        status, model = api.call(f"/v1/models/{MODEL}")
        assert status == 200 and model["published"] == published and [v["version"] for v in model["versions"]] == [1, 2]
        body, content_type = multipart("image", [next(digits[0].glob("*/*.png")).read_bytes()])
        status, answer = api.call(f"/v1/models/{MODEL}/predict?version=3", body, "POST", {"Content-Type": content_type})
        assert status == 404, answer
    assert published_answer(api2, digits[0]) == published
    # What the reconciler does with it once it is old: the number is given up, the objects removed.
    for name, value in stack.env().items():  # boto3 reads the endpoint and key from the environment
        monkeypatch.setenv(name, value)
    store = SharedModelStore.open(stack.settings("reconciler"))
    assert store.sweep(older_than_seconds=0) and stack.objects(f"models/{MODEL}/3/") == []
    assert store.versions(MODEL) == [1, 2]


def test_the_store_gone_is_a_503_and_a_failed_job_never_a_partial_version(stack, digits, trained):
    api1, api2 = stack.apis
    dataset_id, _, published, _ = trained
    stack.flag.touch()
    try:
        job_id = train(api1, dataset_id, publish="always")
        wait_uploading(stack, 4)
        stack.moto.kill()  # the store goes away in the middle of the version's upload
    finally:
        stack.flag.unlink()
    job = stack.wait_job(api2, job_id, timeout=120)
    assert job["status"] == "failed" and "is unreachable (could not write models/scaled/4/" in job["error"], job
    assert job["error"].startswith(f"object store {stack.store_url}"), job
    for api in stack.apis:
        status, model = api.call(f"/v1/models/{MODEL}")  # versions come from the database: still answered
        assert status == 200 and [v["version"] for v in model["versions"]] == [1, 2]
        assert model["published"] == published
        assert published_answer(api, digits[0]) == published  # served from this host's cache
        status, answer = api.upload(digits[1] + b"\0")
        assert status == 503 and answer["error"]["code"] == "store_unavailable", answer
        assert f"object store {stack.store_url} is unreachable" in answer["error"]["message"], answer
        status, answer = api.call(f"/v1/datasets/{dataset_id}")
        assert status == 503 and "is unreachable" in answer["error"]["message"], answer
        status, ready = api.call("/readyz")
        assert status == 503 and "is unreachable" in ready["checks"]["shared_store"], ready
        # A train request checks its dataset in the store first: refused with the reason, no job is made.
        status, answer = api.call(f"/v1/models/{MODEL}/train", {"dataset": dataset_id, **OPTIONS}, "POST")
        assert status == 503 and f"object store {stack.store_url} is unreachable" in answer["error"]["message"]
        assert "Traceback" not in json.dumps(answer)
