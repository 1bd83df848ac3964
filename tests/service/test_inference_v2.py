"""The Open Inference Protocol (KServe V2) endpoints, driven by Triton's own HTTP client (`tritonclient[http]`).

Against a real gunicorn: health, metadata, readiness, and `infer` with images sent in binary and in
JSON, with pixels, with the classification extension and with a compressed body; each answer is
compared with v1's for the same images. In-process (Flask's client, with tritonclient encoding the
bodies and decoding the answers): errors in the protocol's shape, keys, and bad tensors.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service import create_app, extensions
from tests.live import fetch, gunicorn, multipart
from tests.service.conftest import MODEL
from training.images import decode_image, resize_rgb
from training.store import ModelStore

SIZE = 32  # the trained model's image size


@pytest.fixture(scope="module")
def server(trained_settings, tmp_path_factory):
    """gunicorn over the trained store; yields its base URL."""
    log = tmp_path_factory.mktemp("v2") / "gunicorn.log"
    with gunicorn(trained_settings, log, WEB_CONCURRENCY="1") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    """tritonclient's HTTP client on the server."""
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def images(digit_pngs) -> list[bytes]:
    return list(digit_pngs.values())


@pytest.fixture(scope="module")
def classes(trained_settings) -> list[str]:
    return ModelStore(trained_settings.model_dir).labels(MODEL, 1)


@pytest.fixture(scope="module")
def v1_answer(server, images) -> dict:
    """What v1 answers for the images, every class listed."""
    data, content_type = multipart("image", images)
    status, body = fetch(f"{server}/v1/models/{MODEL}/predict?top_k=10", data, {"Content-Type": content_type})
    assert status == 200, body
    return json.loads(body)


def v1_probabilities(answer: dict, classes: list[str]) -> np.ndarray:
    """v1's answer as rows of probabilities in class order (float32, as the model computed them)."""
    rows = [{item["label"]: item["probability"] for item in answer_["top_k"]} for answer_ in answer["predictions"]]
    return np.array([[row[label] for label in classes] for row in rows], np.float32)


def images_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    """A `BYTES [N]` input of encoded image files (base64 strings in JSON, raw bytes in binary)."""
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def rgb_pixels(images: list[bytes]) -> np.ndarray:
    """The images decoded and resized as training and v1 do it, before VGG19's preprocessing: RGB 0-255."""
    return np.stack([resize_rgb(np.asarray(decode_image(image, draft_size=SIZE), np.uint8), SIZE) for image in images])


def test_server_is_live_and_ready_and_names_its_extensions(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])


def test_model_metadata_and_readiness(client):
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "99") and not client.is_model_ready("nosuch")
    metadata = client.get_model_metadata(MODEL, "1")
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("images", "BYTES", (-1,)), ("pixels", "FP32", (-1, SIZE, SIZE, 3))}
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [("probabilities", "FP32", [-1, 3])]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_images_answer_what_v1_answers(client, images, classes, v1_answer, binary):
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(MODEL, [images_input(images, binary)], outputs=[output], request_id="r1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(images), 3)
    assert result.get_response()["model_version"] == "1" and result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(probabilities, v1_probabilities(v1_answer, classes))


def test_pixels_and_uint8_answer_what_v1_answers(client, images, classes, v1_answer):
    expected = v1_probabilities(v1_answer, classes)
    for datatype, pixels in (("FP32", rgb_pixels(images).astype(np.float32)), ("UINT8", rgb_pixels(images))):
        tensor = triton.InferInput("pixels", list(pixels.shape), datatype)
        tensor.set_data_from_numpy(pixels)
        probabilities = client.infer(MODEL, [tensor], model_version="1").as_numpy("probabilities")
        assert np.abs(probabilities - expected).max() <= 1e-6, datatype
        assert (probabilities.argmax(1) == expected.argmax(1)).all()


def test_classification_extension_gives_v1s_top_k(client, images, v1_answer):
    output = triton.InferRequestedOutput("probabilities", class_count=2)
    labels = client.infer(MODEL, [images_input(images)], outputs=[output]).as_numpy("probabilities")
    assert labels.shape == (len(images), 2)
    for row, prediction in zip(labels, v1_answer["predictions"]):
        parsed = [item.decode().split(":") for item in row]
        assert [label for _, _, label in parsed] == [item["label"] for item in prediction["top_k"][:2]]
        assert [float(score) for score, _, _ in parsed] == pytest.approx(
            [item["probability"] for item in prediction["top_k"][:2]], abs=1e-7)


def test_a_gzip_body_answers_the_same(client, images, classes, v1_answer):
    result = client.infer(MODEL, [images_input(images)], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), v1_probabilities(v1_answer, classes))


def test_errors_reach_the_client_with_v1s_statuses(client, images):
    cases = [(lambda: client.infer("nosuch", [images_input(images)]), "404", "nosuch"),
             (lambda: client.infer(MODEL, [images_input([b"not an image"])]), "415", "image"),
             (lambda: client.infer(MODEL, [images_input(images)], model_version="99"), "404", "99")]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == status and words in caught.value.message(), caught.value


# --- in-process: the same bodies through Flask's test client -------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_client(trained_settings):
    """A Flask test client of an app with both keys set."""
    settings = dataclasses.replace(trained_settings, training_api_key="train-key", prediction_api_key="predict-key")
    app = create_app({"SETTINGS": settings, "TESTING": True})
    yield app.test_client()
    extensions.close(app)


PREDICT_KEY = {"Authorization": "Bearer predict-key"}


def post_infer(test_client, inputs, outputs=None, headers=None, path=f"/v2/models/{MODEL}/infer"):
    """POST an inference request encoded by tritonclient; the Flask response."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = dict(headers or {})
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return test_client.post(path, data=body, headers=headers)


def test_binary_answers_decode_with_tritonclient(keyed_client, images):
    response = post_infer(keyed_client, [images_input(images)], headers=PREDICT_KEY)
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    result = triton.InferResult.from_response_body(response.data,
                                                   header_length=int(response.headers["Inference-Header-Content-Length"]))
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(images), 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_keys_apply_and_errors_are_the_protocols_shape(keyed_client, images):
    response = post_infer(keyed_client, [images_input(images)])
    assert response.status_code == 401 and isinstance(response.get_json()["error"], str)
    assert keyed_client.get("/v2/health/live").status_code == 200  # health is public, as /healthz
    assert keyed_client.get(f"/v2/models/{MODEL}", headers=PREDICT_KEY).status_code == 200
    missing = keyed_client.get("/v2/models/nosuch", headers=PREDICT_KEY)
    assert missing.status_code == 404 and "nosuch" in missing.get_json()["error"]
    unknown_route = keyed_client.get("/v2/nothing/here")
    assert unknown_route.status_code == 404 and isinstance(unknown_route.get_json()["error"], str)


def pixels_input(shape, datatype="FP32", fill=1.0) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(shape), datatype)
    tensor.set_data_from_numpy(np.full(shape, fill, {"FP32": np.float32, "INT32": np.int32}[datatype]))
    return tensor


@pytest.mark.parametrize(("inputs", "words"), [
    (lambda images: [pixels_input((1, 16, 16, 3))], "[N, 32, 32, 3]"),
    (lambda images: [pixels_input((1, SIZE, SIZE, 3), fill=np.nan)], "finite"),
    (lambda images: [pixels_input((2, SIZE, SIZE, 3), "INT32")], "FP32"),
    (lambda images: [images_input(images), pixels_input((1, SIZE, SIZE, 3))], "one tensor"),
    (lambda images: [images_input(images * 30)], "1 to 64 images"),
    (lambda images: [images_input([b""])], "image"),
], ids=["wrong-size", "nan", "wrong-type", "two-inputs", "too-many", "empty-image"])
def test_bad_tensors_are_400s_that_say_why(keyed_client, images, inputs, words):
    response = post_infer(keyed_client, inputs(images), headers=PREDICT_KEY)
    assert response.status_code == 400, response.data
    assert words in response.get_json()["error"]


def with_header(document: dict, raw: bytes) -> tuple[bytes, dict]:
    """A binary body: the JSON header, then `raw`; and the header naming its length."""
    header = json.dumps(document).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(("body", "headers", "words"), [
    (b"{not json", {}, "not valid JSON"),
    (b'{"inputs": []}', {}, "list of input tensors"),
    (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', {}, "base64"),
    (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}', {}, "2 elements"),
    (*with_header({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                               "parameters": {"binary_data_size": 7}}]}, b"\x05\x00\x00\x00abc"), "runs past"),
    (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}', {
        "Inference-Header-Content-Length": "9999"}, "body is"),
    (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],'
     b' "outputs": [{"name": "logits"}]}', {}, "only output"),
    (b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"}, "gzip"),
], ids=["json", "no-inputs", "base64", "count", "bytes-overrun", "header-length", "output-name", "gzip"])
def test_bad_bodies_are_400s_that_say_why(keyed_client, body, headers, words):
    response = keyed_client.post(f"/v2/models/{MODEL}/infer", data=body, headers={**PREDICT_KEY, **headers})
    assert response.status_code == 400, response.data
    assert words in response.get_json()["error"]
