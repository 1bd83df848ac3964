"""The API under concurrent load: right answers per request, publish during load, train/serve agreement."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service import create_app, extensions
from tests.service.conftest import MODEL
from training.predict import predict_files


def post_image(client, data: bytes, query: str = ""):
    return client.post(f"/v1/models/{MODEL}/predict{query}", data={"image": (io.BytesIO(data), "x.png")},
                       content_type="multipart/form-data")


def test_api_probabilities_equal_the_library_offline_predictions(client, trained_settings, small_digits_dir):
    paths = sorted(small_digits_dir.glob("*/*.png"))[::3]
    _, offline = predict_files(trained_settings, MODEL, paths, top_k=3)
    for path, expected in zip(paths, offline):
        answer = post_image(client, path.read_bytes(), "?top_k=3").get_json()["predictions"][0]
        assert [t["label"] for t in answer["top_k"]] == [t["label"] for t in expected["top_k"]]
        for got, want in zip(answer["top_k"], expected["top_k"]):
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_many_threads_each_get_their_own_answer(app, small_digits_dir):
    paths = sorted(small_digits_dir.glob("*/*.png"))
    expected = {}
    client = app.test_client()
    for path in paths:
        expected[path] = post_image(client, path.read_bytes()).get_json()["predictions"][0]["label"]

    def one(path):
        response = post_image(app.test_client(), path.read_bytes())
        return path, response.status_code, response.get_json()

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, paths * 4))
    assert len(results) == len(paths) * 4
    for path, status, body in results:
        assert status == 200, body
        assert body["predictions"][0]["label"] == expected[path]


def test_publish_and_roll_back_during_load_give_no_errors(store_settings, digit_pngs):
    app = create_app({"SETTINGS": store_settings, "TESTING": True})
    images = list(digit_pngs.values())
    stop = threading.Event()
    statuses, versions = [], []

    def load():
        client = app.test_client()
        i = 0
        while not stop.is_set():
            response = post_image(client, images[i % len(images)])
            statuses.append(response.status_code)
            versions.append(response.get_json().get("version"))
            i += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        admin = app.test_client()
        for flip in range(20):
            answer = admin.put(f"/v1/models/{MODEL}/published", json={"version": 1 + flip % 2})
            assert answer.status_code == 200, answer.get_json()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        extensions.close(app)
    assert statuses and set(statuses) == {200}
    assert set(versions) <= {1, 2}
