"""The runtime through the API: a hung forward pass answers 503 in time and shows in /readyz, a
deleted version's number never comes back, and replaced files are never served from memory."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import numpy as np
import pytest

from service import create_app, extensions
from service.extensions import get_runtime
from tests.service.conftest import MODEL
from tests.service.test_predict import assert_error, files
from training.options import parse_options
from training.pipeline import train
from training.predict import predict_files


@pytest.fixture
def own_store(trained_settings, tmp_path):
    """Settings over a private copy of the trained store (one version of `digits`)."""
    shutil.copytree(trained_settings.model_dir, tmp_path / "models")
    return dataclasses.replace(trained_settings, model_dir=tmp_path / "models")


@pytest.fixture
def make_app():
    apps = []

    def make(settings):
        app = create_app({"SETTINGS": settings, "TESTING": True})
        apps.append(app)
        return app

    yield make
    for app in apps:
        extensions.close(app)


def backbone_batcher(app):
    with app.app_context():
        return next(s.batcher for s in get_runtime()._cache.values() if s.backbone is not None)


def test_a_hung_forward_pass_answers_503_in_time_and_readyz_says_why(make_app, own_store, digit_pngs):
    app = make_app(dataclasses.replace(own_store, predict_timeout_s=1.0))
    client = app.test_client()
    image = digit_pngs["one"]
    assert client.post(f"/v1/models/{MODEL}/predict", data=files(image)).status_code == 200
    batcher = backbone_batcher(app)
    release, forward = threading.Event(), batcher.forward
    batcher.forward = lambda rows: release.wait(60) and forward(rows)  # a device that stopped answering
    try:
        body = assert_error(client.post(f"/v1/models/{MODEL}/predict", data=files(image)), 503, "timeout",
                            "PREDICT_TIMEOUT_S")
        assert body and client.post(f"/v1/models/{MODEL}/predict", data=files(image)).headers["Retry-After"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert "forward pass" in ready.get_json()["checks"]["batching"]
    finally:
        release.set()
        batcher.forward = forward
    deadline = time.monotonic() + 10  # the released forward pass finishes, and the batcher is ready again
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").get_json()
        time.sleep(0.05)
    assert client.post(f"/v1/models/{MODEL}/predict", data=files(image)).status_code == 200


def probabilities(answer: dict) -> list[list[float]]:
    return [[t["probability"] for t in sorted(p["top_k"], key=lambda t: t["label"])] for p in answer["predictions"]]


def test_a_deleted_version_number_is_never_reused_and_the_new_weights_are_served(
        make_app, own_store, small_digits_dir, digit_pngs):
    client = make_app(own_store).test_client()
    image = digit_pngs["two"]
    options = {"image_size": 32, "epochs": 3, "seed": 1, "publish": "never"}
    second = train(small_digits_dir, MODEL, own_store, parse_options(options))
    assert second.version == 2
    old = client.post(f"/v1/models/{MODEL}/predict?version=2&top_k=3", data=files(image)).get_json()
    assert client.delete(f"/v1/models/{MODEL}/versions/2").status_code == 204

    third = train(small_digits_dir, MODEL, own_store, parse_options({"image_size": 32, "epochs": 8, "seed": 2}))
    assert third.version == 3
    assert_error(client.post(f"/v1/models/{MODEL}/predict?version=2", data=files(image)), 404, "not_found")
    new = client.post(f"/v1/models/{MODEL}/predict?version=3&top_k=3", data=files(image)).get_json()
    first_two = sorted((small_digits_dir / "two").glob("*.png"))[0]  # the file digit_pngs["two"] holds
    _, offline = predict_files(own_store, MODEL, [first_two], version=3)
    np.testing.assert_allclose(probabilities(new), probabilities({"predictions": offline}), atol=1e-5)
    assert not np.allclose(probabilities(new), probabilities(old), atol=1e-4)


def test_files_replaced_under_the_same_number_are_served_fresh(make_app, own_store, small_digits_dir, digit_pngs):
    """Even where a number is reused behind the store's back (a restored backup), memory never serves old files."""
    client = make_app(own_store).test_client()
    image = digit_pngs["zero"]
    before = client.post(f"/v1/models/{MODEL}/predict?top_k=3", data=files(image)).get_json()
    other = train(small_digits_dir, "other", own_store, parse_options({"image_size": 32, "epochs": 8, "seed": 3}))
    version_dir = own_store.model_dir / MODEL / "1"
    shutil.rmtree(version_dir)
    shutil.copytree(own_store.model_dir / "other" / str(other.version), version_dir)
    after = client.post(f"/v1/models/{MODEL}/predict?top_k=3", data=files(image)).get_json()
    expected = client.post("/v1/models/other/predict?top_k=3", data=files(image)).get_json()
    assert after["version"] == before["version"] == 1
    np.testing.assert_allclose(probabilities(after), probabilities(expected), atol=1e-6)
    assert not np.allclose(probabilities(after), probabilities(before), atol=1e-4)
