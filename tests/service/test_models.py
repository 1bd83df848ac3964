"""Model registry endpoints: list, describe, plots, publish / roll back, delete."""

from __future__ import annotations

import pytest

from tests.service.conftest import MODEL
from tests.service.test_predict import assert_error


def test_list_models(client, trained_settings):
    response = client.get("/v1/models")
    assert response.status_code == 200
    [model] = response.get_json()["models"]
    assert model["name"] == MODEL and model["versions"] == [1] and model["published"] == 1
    assert model["classes"] == ["one", "two", "zero"]
    assert 0.0 <= model["accuracy"] <= 1.0
    assert model["url"] == f"/v1/models/{MODEL}"


def test_list_of_an_empty_store(fake_app):
    assert fake_app().test_client().get("/v1/models").get_json() == {"models": []}


def test_describe_model_with_plot_urls(client):
    response = client.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == MODEL and body["published"] == 1
    [version] = body["versions"]
    assert version["version"] == 1 and version["published"] is True
    assert version["classes"] == ["one", "two", "zero"]
    assert {"accuracy", "confusion_matrix"} <= set(version["metrics"])
    assert version["params"]["image_size"] == 32
    assert version["backbone"]["image_size"] == 32
    assert set(version["plots"]) == {"training.png", "confusion_matrix.png"}
    for url in version["plots"].values():
        plot = client.get(url)
        assert plot.status_code == 200 and plot.mimetype == "image/png"
        assert plot.data.startswith(b"\x89PNG")


@pytest.mark.parametrize("path", [
    f"/v1/models/{MODEL}/versions/1/plots/missing.png",
    f"/v1/models/{MODEL}/versions/1/plots/..%2Fmetadata.json",
    f"/v1/models/{MODEL}/versions/1/plots/../metadata.json",
    f"/v1/models/{MODEL}/versions/1/plots/%2E%2E",
    f"/v1/models/{MODEL}/versions/7/plots/training.png",
    "/v1/models/nosuch/versions/1/plots/training.png",
])
def test_only_stored_plots_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_unknown_and_malformed_model_names(client):
    assert_error(client.get("/v1/models/nosuch"), 404, "not_found", "nosuch")
    assert_error(client.get("/v1/models/.hidden"), 400, "bad_request", "model name")
    assert_error(client.get("/v1/nothing"), 404, "not_found")


def test_publish_and_roll_back(store_client):
    response = store_client.put(f"/v1/models/{MODEL}/published", json={"version": 2})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"name": MODEL, "published": 2}
    assert store_client.get("/v1/models").get_json()["models"][0]["published"] == 2
    store_client.put(f"/v1/models/{MODEL}/published", json={"version": 1})
    versions = store_client.get(f"/v1/models/{MODEL}").get_json()["versions"]
    assert [v["published"] for v in versions] == [True, False]


@pytest.mark.parametrize("body, status, says", [
    ({"version": 9}, 404, "no version 9"),
    ({"version": 0}, 400, "version"),
    ({"version": "2"}, 400, "version"),
    ({}, 400, "version"),
    ({"version": 2, "extra": 1}, 400, "extra"),
])
def test_publish_errors(store_client, body, status, says):
    assert_error(store_client.put(f"/v1/models/{MODEL}/published", json=body), status, says=says)


def test_publish_with_bad_json_or_unknown_model(store_client, store_settings):
    response = store_client.put(f"/v1/models/{MODEL}/published", data="{", content_type="application/json")
    assert_error(response, 400, "bad_request", "json")
    assert_error(store_client.put("/v1/models/nosuch/published", json={"version": 1}), 404, "not_found")
    assert not (store_settings.model_dir / "nosuch").exists()  # a 404 leaves no trace in the store


def test_delete_version(store_client, store_settings):
    response = store_client.delete(f"/v1/models/{MODEL}/versions/2")
    assert response.status_code == 204 and response.data == b""
    assert not (store_settings.model_dir / MODEL / "2").exists()
    assert store_client.get("/v1/models").get_json()["models"][0]["versions"] == [1]


def test_delete_errors(store_client):
    assert_error(store_client.delete(f"/v1/models/{MODEL}/versions/1"), 409, "conflict", "published")
    assert_error(store_client.delete(f"/v1/models/{MODEL}/versions/9"), 404, "not_found")
    assert_error(store_client.delete("/v1/models/nosuch/versions/1"), 404, "not_found")
    assert_error(store_client.delete(f"/v1/models/{MODEL}"), 405, "method_not_allowed")
