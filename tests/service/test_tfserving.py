"""TensorFlow Serving's REST API, checked with the request and response shapes of its documentation
(tensorflow_serving/g3doc/api_rest.md): row and columnar predict, classify, metadata, model status, errors.
Every answer is compared with v1's for the same images.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tests.service.conftest import MODEL
from tests.service.test_inference_v2 import rgb_pixels
from training.store import ModelStore


@pytest.fixture(scope="module")
def images(digit_pngs) -> list[bytes]:
    return list(digit_pngs.values())


@pytest.fixture(scope="module")
def b64(images) -> list[str]:
    return [base64.b64encode(image).decode() for image in images]


@pytest.fixture(scope="module")
def classes(trained_settings) -> list[str]:
    return ModelStore(trained_settings.model_dir).labels(MODEL, 1)


@pytest.fixture
def expected(client, images, classes) -> np.ndarray:
    """v1's probabilities for the images, in class order."""
    answer = client.post(f"/v1/models/{MODEL}/predict?top_k=10",
                         data={"image": [(io.BytesIO(i), f"{n}.png") for n, i in enumerate(images)]})
    assert answer.status_code == 200, answer.data
    rows = [{item["label"]: item["probability"] for item in p["top_k"]} for p in answer.get_json()["predictions"]]
    return np.array([[row[label] for label in classes] for row in rows])


@pytest.mark.parametrize("body", [
    lambda b64, _: {"instances": [{"b64": text} for text in b64]},
    lambda b64, _: {"signature_name": "serving_default", "instances": [{"images": {"b64": text}} for text in b64]},
    lambda _, pixels: {"instances": pixels.tolist()},
    lambda _, pixels: {"instances": [{"pixels": p} for p in pixels.tolist()]},
], ids=["b64", "named-b64", "pixels", "named-pixels"])
def test_row_format_predicts_what_v1_does(client, b64, images, expected, body):
    response = client.post(f"/v1/models/{MODEL}:predict", json=body(b64, rgb_pixels(images)))
    assert response.status_code == 200, response.data
    predictions = np.array(response.get_json()["predictions"])
    assert predictions.shape == expected.shape
    assert np.abs(predictions - expected).max() <= 1e-6


@pytest.mark.parametrize("body", [
    lambda b64: {"inputs": [{"b64": text} for text in b64]},
    lambda b64: {"inputs": {"images": [{"b64": text} for text in b64]}},
], ids=["list", "named"])
def test_columnar_format_answers_outputs(client, b64, expected, body):
    response = client.post(f"/v1/models/{MODEL}/versions/1:predict", json=body(b64))
    assert response.status_code == 200, response.data
    assert set(response.get_json()) == {"outputs"}
    assert np.abs(np.array(response.get_json()["outputs"]) - expected).max() <= 1e-6


def test_classify_lists_every_class_best_first(client, b64, classes, expected):
    # The documentation's classify example: an image feature and a caption (which the model ignores).
    body = {"examples": [{"image": {"b64": text}, "caption": "seaside"} for text in b64]}
    response = client.post(f"/v1/models/{MODEL}:classify", json=body)
    assert response.status_code == 200, response.data
    result = response.get_json()["result"]
    for pairs, row in zip(result, expected):
        assert [label for label, _ in pairs] == [classes[i] for i in np.argsort(-row, kind="stable")]
        assert [score for _, score in pairs] == pytest.approx(sorted(row, reverse=True), abs=1e-6)


def test_metadata_describes_the_serving_signature(client):
    response = client.get(f"/v1/models/{MODEL}/metadata")
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert [d["size"] for d in signature["inputs"]["pixels"]["tensor_shape"]["dim"]] == ["-1", "32", "32", "3"]
    assert signature["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"


def test_model_status_reads_as_tf_servings(client):
    expected = [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    assert client.get(f"/v1/models/{MODEL}").get_json()["model_version_status"] == expected
    one = client.get(f"/v1/models/{MODEL}/versions/1")
    assert one.status_code == 200 and one.get_json()["model_version_status"] == expected
    assert one.get_json()["version"] == 1 and one.get_json()["classes"]
    assert client.get(f"/v1/models/{MODEL}/versions/9").status_code == 404


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/v1/models/half:predict", {"instances": [1.0, 5.0]}, 404, "half"),  # the documentation's error example
    (f"/v1/models/{MODEL}:predict", {"instances": ["aGk="]}, 400, "b64"),
    (f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "aGk="}], "inputs": []}, 400, "not both"),
    (f"/v1/models/{MODEL}:predict", {"instances": [[[[1, 2, 3]]]]}, 400, "[N, 32, 32, 3]"),
    (f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "aGk="}], "signature_name": "other"}, 400, "signature"),
    (f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "aGk="}]}, 415, "image"),
    (f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "aGk="}] * 65}, 400, "1 to 64"),
    (f"/v1/models/{MODEL}:classify", {"examples": [{"caption": "x"}]}, 400, "one image feature"),
    (f"/v1/models/{MODEL}/versions/7:predict", {"instances": [{"b64": "aGk="}]}, 404, "7"),
], ids=["documented-404", "bare-string", "both", "pixel-shape", "signature", "not-image", "too-many", "no-image",
        "no-version"])
def test_errors_are_tf_servings_shape(client, path, body, status, words):
    response = client.post(path, json=body)
    assert response.status_code == status, response.data
    assert isinstance(response.get_json()["error"], str) and words in response.get_json()["error"]


def test_nan_pixels_are_refused(client):
    pixels = np.zeros((1, 32, 32, 3)).tolist()
    pixels[0][0][0][0] = float("nan")  # TF Serving's JSON allows NaN; a pixel may not be one
    response = client.post(f"/v1/models/{MODEL}:predict", data=json.dumps({"instances": pixels}),
                           content_type="application/json")
    assert response.status_code == 400 and "finite" in response.get_json()["error"]
