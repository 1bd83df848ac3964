"""API keys: who may call what, and where the service may listen without keys."""

from __future__ import annotations

import io

import pytest

from service.auth import check_bind, is_loopback
from tests.service.conftest import MODEL
from training.settings import Settings

TRAIN_KEY, PREDICT_KEY = "train-secret", "predict-secret"
PREDICT_ENDPOINTS = [
    ("get", "/v1/models"),
    ("get", f"/v1/models/{MODEL}"),
    ("get", f"/v1/models/{MODEL}/versions/1/plots/training.png"),
    ("post", f"/v1/models/{MODEL}/predict"),
    ("post", f"/v1/predict?models={MODEL}"),
]
TRAIN_ENDPOINTS = [
    ("put", f"/v1/models/{MODEL}/published"),
    ("delete", f"/v1/models/{MODEL}/versions/2"),
]
OPEN_ENDPOINTS = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/assets/swagger-ui.css"]


@pytest.fixture
def keyed_client(store_settings):
    """A client of an app with both keys set, over a private store, with a stand-in runtime."""
    import dataclasses

    from service import create_app
    from tests.service.conftest import FakeRuntime

    settings = dataclasses.replace(store_settings, training_api_key=TRAIN_KEY, prediction_api_key=PREDICT_KEY)
    app = create_app({"SETTINGS": settings, "TESTING": True})
    app.extensions["runtime"].set(FakeRuntime())
    return app.test_client()


def call(client, method: str, path: str, headers: dict | None = None):
    """Send a well-formed request for the endpoint, so only the key decides the answer."""
    kwargs: dict = {"headers": headers or {}}
    if method == "post":
        kwargs["data"] = {"image": [(io.BytesIO(b"png"), "a.png")]}
    if method == "put":
        kwargs["json"] = {"version": 1}
    return getattr(client, method)(path, **kwargs)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method, path", PREDICT_ENDPOINTS + TRAIN_ENDPOINTS)
def test_no_key_or_unknown_key_is_401(keyed_client, method, path):
    for headers in ({}, bearer("wrong"), {"X-API-Key": "wrong"}, {"Authorization": "Basic dHJhaW4="},
                    {"X-API-Key": "ключ"}):
        response = call(keyed_client, method, path, headers)
        assert response.status_code == 401, (headers, response.get_data(as_text=True))
        assert response.get_json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method, path", PREDICT_ENDPOINTS)
def test_prediction_key_may_predict_and_read(keyed_client, method, path):
    for headers in (bearer(PREDICT_KEY), {"X-API-Key": PREDICT_KEY}):
        assert call(keyed_client, method, path, headers).status_code == 200


@pytest.mark.parametrize("method, path", TRAIN_ENDPOINTS)
def test_prediction_key_on_a_training_endpoint_is_403(keyed_client, method, path):
    response = call(keyed_client, method, path, bearer(PREDICT_KEY))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("method, path", PREDICT_ENDPOINTS + TRAIN_ENDPOINTS)
def test_training_key_may_do_everything(keyed_client, method, path):
    for headers in (bearer(TRAIN_KEY), {"X-API-Key": TRAIN_KEY}):
        assert call(keyed_client, method, path, headers).status_code in (200, 204)
        if method == "delete":
            break  # deleted now


@pytest.mark.parametrize("path", OPEN_ENDPOINTS)
def test_probes_metrics_and_docs_stay_open(keyed_client, path):
    assert keyed_client.get(path).status_code == 200


def test_unknown_paths_and_methods_answer_404_and_405_without_a_key(keyed_client):
    assert keyed_client.get("/v1/nothing").status_code == 404
    assert keyed_client.get(f"/v1/models/{MODEL}/predict").status_code == 405


def test_without_keys_everything_is_open_and_a_warning_is_logged(fake_app, log_lines):
    lines = log_lines("service.auth")
    client = fake_app().test_client()
    assert any("no API keys configured" in line for line in lines)
    assert client.put("/v1/models/nosuch/published", json={"version": 1}).status_code == 404  # not 401


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True), ("::1", True),
    ("unix:/run/classifier.sock", True), ("0.0.0.0:8000", False), ("0.0.0.0", False), ("[::]:8000", False),
    ("192.168.1.5:80", False), ("example.com:80", False), ("", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


def test_no_keys_refuses_to_bind_beyond_loopback():
    with pytest.raises(SystemExit, match="TRAINING_API_KEY"):
        check_bind(Settings(), ["0.0.0.0:8000"])
    check_bind(Settings(), ["127.0.0.1:8000"])
    check_bind(Settings(training_api_key="k"), ["0.0.0.0:8000"])
