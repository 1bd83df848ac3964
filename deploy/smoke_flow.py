"""The HTTP half of the container smoke test (deploy/smoke.sh): upload a tiny dataset, wait for the ingest
worker's report, train a model on it through the API, predict (v1 and the Open Inference Protocol), and
export the version through the training worker.

    python deploy/smoke_flow.py --url http://127.0.0.1:8091

Reads TRAINING_API_KEY and PREDICTION_API_KEY from the environment (the keys the stack was started
with). Exits non-zero, saying which step failed, on the first answer that is not the expected one.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import requests

CLASSES = ("zero", "one", "two")


def fail(message: str) -> None:
    """Stop the smoke test with a reason."""
    print(f"[smoke] FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def say(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def expect(response: requests.Response, status: int, what: str) -> dict:
    """Return the JSON of a response with the expected status, or fail showing what came instead."""
    if response.status_code != status:
        fail(f"{what}: expected HTTP {status}, got {response.status_code}: {response.text[:500]}")
    try:
        return response.json()
    except ValueError:
        fail(f"{what}: the answer is not JSON: {response.text[:200]}")
    raise AssertionError  # unreachable: fail() exits


def wait_ready(url: str, timeout_s: float) -> float:
    """Wait for /readyz to answer 200; return the seconds it took."""
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout_s:
        try:
            response = requests.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(2)
    fail(f"/readyz not ready after {timeout_s:.0f} s; last answer: {last}")
    raise AssertionError


def wait_ingested(url: str, dataset: dict, auth: dict, timeout_s: float) -> dict:
    """Poll an uploaded dataset until the ingest worker made it ready; fail when it failed or took too long."""
    deadline = time.monotonic() + timeout_s
    while dataset["status"] in ("queued", "ingesting"):
        if time.monotonic() > deadline:
            fail(f"dataset {dataset['id']} still {dataset['status']} after {timeout_s:.0f} s: is the ingest worker up?")
        time.sleep(1)
        dataset = expect(requests.get(f"{url}{dataset['url']}", headers=auth, timeout=30), 200, "dataset")
    if dataset["status"] != "ready":
        fail(f"dataset {dataset['id']} ended {dataset['status']}: {dataset.get('error')}")
    return dataset


def make_dataset(folder: Path) -> tuple[bytes, list[Path]]:
    """Zip 3 classes x 12 real digit images at 32 px; return the zip and one held-out image per class."""
    from training.demo import write_digits_dataset

    root = folder / "digits"
    held = write_digits_dataset(root, image_size=32, per_class=13, holdout=len(CLASSES), classes=len(CLASSES))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*.png")):
            archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue(), held


def run(url: str, train_key: str, predict_key: str, timeout_s: float) -> None:
    timings: dict[str, float] = {}
    timings["ready"] = wait_ready(url, timeout_s)
    say(f"/readyz ready after {timings['ready']:.1f} s")
    train_auth = {"Authorization": f"Bearer {train_key}"}
    predict_auth = {"X-API-Key": predict_key}

    with tempfile.TemporaryDirectory(prefix="classifier-smoke-") as tmp:
        archive, held = make_dataset(Path(tmp))
        # Keys are enforced: none is 401, the prediction key may not upload.
        expect(requests.post(f"{url}/v1/datasets", files={"file": ("d.zip", archive)}, timeout=60), 401,
               "upload without a key")
        expect(requests.post(f"{url}/v1/datasets", files={"file": ("d.zip", archive)}, headers=predict_auth,
                             timeout=60), 403, "upload with the prediction key")
        started = time.monotonic()
        dataset = expect(requests.post(f"{url}/v1/datasets", files={"file": ("digits.zip", archive)},
                                       headers=train_auth, timeout=120), 202, "dataset upload")
        timings["upload"] = time.monotonic() - started
        dataset = wait_ingested(url, dataset, train_auth, timeout_s)
        timings["ingest"] = time.monotonic() - started - timings["upload"]
        if dataset.get("classes") != {label: 12 for label in CLASSES}:
            fail(f"dataset classes: expected 12 images of each of {CLASSES}, got {dataset.get('classes')}")
        say(f"dataset {dataset['id']}: {dataset['images']} images, uploaded in {timings['upload']:.1f} s, "
            f"ingested by the ingest worker {timings['ingest']:.1f} s later")

        started = time.monotonic()
        body = {"dataset": dataset["id"], "epochs": 5, "image_size": 32, "patience": 5}
        job = expect(requests.post(f"{url}/v1/models/smoke/train", json=body, headers=train_auth, timeout=60),
                     202, "train request")["job"]
        say(f"job {job['id']} {job['status']}")
        status = job["status"]
        while status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() - started > timeout_s:
                fail(f"job {job['id']} still {status} after {timeout_s:.0f} s")
            time.sleep(2)
            job = expect(requests.get(f"{url}/v1/jobs/{job['id']}", headers=train_auth, timeout=30), 200, "job")
            if job["status"] != status:
                say(f"job {job['id']} {job['status']} after {time.monotonic() - started:.1f} s")
                status = job["status"]
        timings["train job"] = time.monotonic() - started
        if status != "succeeded":
            fail(f"job {job['id']} ended {status}: {job.get('error')}")
        version = job["result"]["version"]
        say(f"model smoke v{version} trained in {timings['train job']:.1f} s: metrics {job['result'].get('metrics')}")

        started = time.monotonic()
        held_images = [path.read_bytes() for path in held]  # the folder goes with the `with`
        files = [("image", (path.name, data, "image/png")) for path, data in zip(held, held_images)]
        answer = expect(requests.post(f"{url}/v1/models/smoke/predict?top_k=2", files=files, headers=predict_auth,
                                      timeout=120), 200, "predict")
        timings["predict"] = time.monotonic() - started
    predictions = answer.get("predictions")
    if answer.get("model") != "smoke" or answer.get("version") != version:
        fail(f"predict answered for {answer.get('model')} v{answer.get('version')}, expected smoke v{version}")
    if not isinstance(predictions, list) or len(predictions) != len(held):
        fail(f"expected {len(held)} predictions, got {predictions!r}")
    for prediction in predictions:
        if prediction.get("label") not in CLASSES or not 0 <= prediction.get("probability", -1) <= 1:
            fail(f"a prediction outside the trained classes or probabilities: {prediction}")
        top = prediction.get("top_k", [])
        if len(top) != 2 or {item["label"] for item in top} - set(CLASSES) or top[0]["label"] != prediction["label"]:
            fail(f"top_k is not two of the trained classes, best first: {prediction}")
    say(f"predicted {len(predictions)} held-out images: "
        + ", ".join(f"{path.stem}->{p['label']}" for path, p in zip(held, predictions)))
    listed = expect(requests.get(f"{url}/v1/models", headers=predict_auth, timeout=30), 200, "model list")
    smoke = [model for model in listed.get("models", []) if model.get("name") == "smoke"]
    if not smoke or smoke[0].get("published") != version or sorted(smoke[0].get("classes", [])) != sorted(CLASSES):
        fail(f"/v1/models does not list smoke v{version} published with classes {CLASSES}: {listed}")
    started = time.monotonic()
    check_protocol_and_export(url, train_auth, predict_auth, version, held_images, predictions, timeout_s)
    timings["v2 infer and export"] = time.monotonic() - started
    say("timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))


def check_protocol_and_export(url: str, train_auth: dict, predict_auth: dict, version: int, images: list[bytes],
                              predictions: list[dict], timeout_s: float) -> None:
    """The Open Inference Protocol answers v1's labels; an export made by the worker container does too."""
    import base64

    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(image).decode() for image in images]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    answer = expect(requests.post(f"{url}/v2/models/smoke/infer", json=body, headers=predict_auth, timeout=120), 200,
                    "v2 infer")
    labels = [item.split(":")[2] for item in answer["outputs"][0]["data"]]
    if labels != [p["label"] for p in predictions]:
        fail(f"v2 infer answered {labels}, v1 {[p['label'] for p in predictions]}")
    say(f"v2 infer (Open Inference Protocol) answers v1's labels: {labels}")

    export_url = f"{url}/v1/models/smoke/versions/{version}/export?format=keras"
    deadline = time.monotonic() + timeout_s
    while (response := requests.get(export_url, headers=train_auth, timeout=120)).status_code == 202:
        if time.monotonic() > deadline:
            fail(f"the keras export is still {response.json()['export']['status']} after {timeout_s:.0f} s")
        time.sleep(2)
    if response.status_code != 200:
        fail(f"export: expected HTTP 200, got {response.status_code}: {response.text[:500]}")
    exported = exported_labels(response.content, images)
    if exported != [p["label"] for p in predictions]:
        fail(f"the exported model answers {exported}, the service {[p['label'] for p in predictions]}")
    say(f"export ({len(response.content) / 2**20:.0f} MB, made by the worker container) answers the service's "
        "labels")


def exported_labels(archive: bytes, images: list[bytes]) -> list[str]:
    """Top-1 labels of the images by the exported Keras model, loaded as a user would (no project code)."""
    import tarfile

    import keras
    import numpy as np

    from training.images import decode_image, resize_rgb

    with tempfile.TemporaryDirectory(prefix="classifier-smoke-export-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        model = keras.saving.load_model(Path(folder) / "model.keras", safe_mode=True)
        labels = (Path(folder) / "labels.txt").read_text().split()
    size = model.input_shape[1]
    pixels = np.stack([resize_rgb(np.asarray(decode_image(image, draft_size=size)), size) for image in images])
    return [labels[i] for i in np.asarray(model.predict(pixels.astype(np.float32), verbose=0)).argmax(1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the API's base URL, on loopback")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness and for the job")
    args = parser.parse_args()
    train_key, predict_key = os.environ.get("TRAINING_API_KEY"), os.environ.get("PREDICTION_API_KEY")
    if not train_key or not predict_key:
        fail("TRAINING_API_KEY and PREDICTION_API_KEY must be set to the stack's keys")
    run(args.url.rstrip("/"), train_key, predict_key, args.timeout)


if __name__ == "__main__":
    main()
