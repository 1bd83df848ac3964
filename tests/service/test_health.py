"""Liveness and readiness."""

from __future__ import annotations

from tests.service.conftest import FakeRuntime


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_with_the_real_runtime(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "ready"
    assert body["checks"]["model_store"] == "ok"
    assert body["checks"]["backbone"] == "ok"


def test_readyz_503_names_the_runtime_reasons(fake_app):
    client = fake_app(FakeRuntime(readiness={"backbone": "weights file /x.h5 is missing", "store": "ok"})).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "not_ready"
    assert body["checks"]["backbone"] == "weights file /x.h5 is missing"
    assert body["error"] == {"code": "not_ready", "message": "backbone: weights file /x.h5 is missing"}
    assert response.headers["Retry-After"] == "5"


def test_readyz_503_when_the_store_is_unusable(tmp_path, fake_app):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the store folder should be")
    response = fake_app().test_client().get("/readyz")
    assert response.status_code == 503
    assert "model store" in response.get_json()["checks"]["model_store"]


def test_readyz_503_when_the_runtime_cannot_be_built(fake_app):
    class Broken(FakeRuntime):
        def readiness(self):
            raise RuntimeError("backbone exploded")

    response = fake_app(Broken()).test_client().get("/readyz")
    assert response.status_code == 503
    assert "backbone exploded" in response.get_json()["checks"]["runtime"]
