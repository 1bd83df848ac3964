"""Prediction endpoints with a real trained model, and every bad-input answer."""

from __future__ import annotations

import base64
import io
import json

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.service.conftest import MODEL

PREDICT = f"/v1/models/{MODEL}/predict"


def files(*images: bytes, field: str = "image") -> dict:
    """A multipart form with one file part per image."""
    return {field: [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]}


def b64_body(*images: bytes) -> dict:
    return {"instances": [{"b64": base64.b64encode(data).decode()} for data in images]}


def assert_error(response, status: int, code: str | None = None, says: str = "") -> dict:
    """The answer is the JSON error shape with this status (and code), and its message says `says`."""
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"code", "message"}
    if code:
        assert error["code"] == code
    assert says.lower() in error["message"].lower(), error["message"]
    return error


def test_multipart_predict_answers_in_input_order(client, digit_pngs):
    labels = list(digit_pngs)
    response = client.post(PREDICT, data=files(*digit_pngs.values()))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["model"] == MODEL and body["version"] == 1
    assert len(body["predictions"]) == len(labels)
    for prediction in body["predictions"]:
        assert prediction["label"] in labels and 0.0 <= prediction["probability"] <= 1.0
        assert len(prediction["top_k"]) == 3  # 3 classes, default top_k 3
        assert prediction["top_k"][0] == {"label": prediction["label"], "probability": prediction["probability"]}
        assert sum(item["probability"] for item in prediction["top_k"]) == pytest.approx(1.0, abs=1e-4)
    # Input order: the same image alone gets the same answer as in the batch.
    alone = client.post(PREDICT, data=files(digit_pngs[labels[1]])).get_json()["predictions"][0]
    assert alone["label"] == body["predictions"][1]["label"]
    assert alone["probability"] == pytest.approx(body["predictions"][1]["probability"], abs=1e-4)


def test_json_base64_predict_with_top_k_and_version(client, digit_pngs):
    images = list(digit_pngs.values())
    response = client.post(f"{PREDICT}?top_k=1&version=1", json=b64_body(*images))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["version"] == 1 and len(body["predictions"]) == len(images)
    assert all(len(p["top_k"]) == 1 for p in body["predictions"])
    multipart = client.post(f"{PREDICT}?top_k=1", data=files(*images)).get_json()
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in multipart["predictions"]]


def test_base64_with_line_breaks_and_data_url_prefix(client, digit_pngs):
    encoded = base64.encodebytes(next(iter(digit_pngs.values()))).decode()  # wrapped at 76 columns
    body = {"instances": [{"b64": encoded}, {"b64": "data:image/png;base64," + encoded.replace("\n", "")}]}
    response = client.post(PREDICT, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)


def test_predict_many_models(client, digit_pngs):
    response = client.post(f"/v1/predict?models={MODEL},{MODEL}&top_k=2", data=files(*digit_pngs.values()))
    assert response.status_code == 200, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert len(results) == 1  # repeats are dropped
    assert results[0]["model"] == MODEL and results[0]["version"] == 1
    assert len(results[0]["predictions"]) == len(digit_pngs)
    assert all(len(p["top_k"]) == 2 for p in results[0]["predictions"])


def test_unknown_model_and_version_are_404(client, digit_pngs):
    image = next(iter(digit_pngs.values()))
    assert_error(client.post("/v1/models/nosuch/predict", data=files(image)), 404, "not_found", "nosuch")
    assert_error(client.post(f"{PREDICT}?version=99", data=files(image)), 404, "not_found", "99")
    assert_error(client.post(f"/v1/predict?models={MODEL},nosuch", data=files(image)), 404, "not_found")


@pytest.mark.parametrize("query", ["top_k=0", "top_k=101", "top_k=abc", "version=0", "version=x"])
def test_bad_query_is_400_naming_the_field(client, digit_pngs, query):
    field = query.partition("=")[0]
    assert_error(client.post(f"{PREDICT}?{query}", data=files(next(iter(digit_pngs.values())))), 400,
                 "bad_request", field)


@pytest.mark.parametrize("query", ["", "?models=", "?models=,,", "?models=bad%20name", "?models=a&top_k=0"])
def test_bad_models_query_is_400(client, digit_pngs, query):
    assert_error(client.post(f"/v1/predict{query}", data=files(next(iter(digit_pngs.values())))), 400,
                 "bad_request")


def test_malformed_model_name_is_400(client, digit_pngs):
    assert_error(client.post("/v1/models/..bad/predict", data=files(next(iter(digit_pngs.values())))), 400,
                 "bad_request", "model name")


def test_bad_base64_is_400_naming_the_instance(client, digit_pngs):
    body = b64_body(next(iter(digit_pngs.values())))
    body["instances"].append({"b64": "not base64!"})
    assert_error(client.post(PREDICT, json=body), 400, "bad_request", "instances[1].b64")


@pytest.mark.parametrize("body, says", [
    ({"instances": []}, "no images"),
    ({"instances": [{"b64": ""}]}, "instances[0].b64 is empty"),
    ({"instances": [{"data": "x"}]}, "instances.0.b64"),
    ({"images": []}, "instances"),
    ([1, 2], "object"),
    ({"instances": "x"}, "instances"),
])
def test_bad_json_bodies_are_400(client, body, says):
    assert_error(client.post(PREDICT, json=body), 400, "bad_request", says)


def test_invalid_json_is_400(client):
    response = client.post(PREDICT, data=b"{not json", content_type="application/json")
    assert_error(response, 400, "bad_request", "not valid JSON")


def test_empty_part_is_400_naming_its_index(client, digit_pngs):
    image = next(iter(digit_pngs.values()))
    assert_error(client.post(PREDICT, data=files(image, b"")), 400, "bad_request", "image[1] is empty")


def test_no_images_is_400(client):
    response = client.post(PREDICT, data={"other": "x"}, content_type="multipart/form-data")
    assert_error(response, 400, "bad_request", "no images")
    assert_error(client.post(PREDICT, data=files(b"x", field="picture")), 400, "bad_request", "'image'")


def test_too_many_images_is_400(client, digit_pngs):
    image = next(iter(digit_pngs.values()))
    assert_error(client.post(PREDICT, data=files(*[image] * 65)), 400, "bad_request", "at most 64")
    assert_error(client.post(PREDICT, json=b64_body(*[image] * 65)), 400, "bad_request", "at most 64")


def test_non_image_bytes_are_415(client, digit_pngs):
    response = client.post(PREDICT, data=files(next(iter(digit_pngs.values())), b"%PDF-1.4 not an image"))
    assert_error(response, 415, "unsupported_media_type", "image 1")
    truncated = next(iter(digit_pngs.values()))[:60]
    assert_error(client.post(PREDICT, json=b64_body(truncated)), 400, "bad_request", "image 0")  # broken: 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "image/png", None])
def test_wrong_content_type_is_415(client, digit_pngs, content_type):
    response = client.post(PREDICT, data=next(iter(digit_pngs.values())), content_type=content_type)
    assert_error(response, 415, "unsupported_media_type", "multipart/form-data")


def test_wrong_method_is_405(client):
    response = client.get(PREDICT)
    assert_error(response, 405, "method_not_allowed", "GET")
    assert "POST" in response.headers["Allow"]


def big_body(size: int) -> bytes:
    return b'{"instances": [{"b64": "' + b"A" * size + b'"}]}'


def test_body_over_max_predict_is_413_with_content_length(fake_app):
    client = fake_app(max_predict_mb=1).test_client()
    response = client.post(PREDICT, data=big_body(2 * 2**20), content_type="application/json")
    assert_error(response, 413, "too_large", "1 MiB")
    response = client.post(PREDICT, data=files(b"x" * (2 * 2**20)))
    assert_error(response, 413, "too_large", "MAX_PREDICT_MB")
    response = client.post("/v1/predict?models=digits", data=files(b"x" * (2 * 2**20)))
    assert_error(response, 413, "too_large", "MAX_PREDICT_MB")


def test_prediction_bodies_have_their_own_limit_below_the_upload_limit(fake_app):
    """Dataset uploads may be far larger than a prediction request (MAX_UPLOAD_MB vs MAX_PREDICT_MB)."""
    client = fake_app(max_predict_mb=1, max_upload_mb=8).test_client()
    body = b"x" * (2 * 2**20)
    assert_error(client.post(PREDICT, data=files(body)), 413, "too_large", "MAX_PREDICT_MB")
    upload = client.post("/v1/datasets", data={"file": (io.BytesIO(body), "photos.zip")})
    assert upload.status_code == 400, upload.get_json()  # read whole and refused as an archive, not as too large
    response = client.post("/v1/datasets", data={"file": (io.BytesIO(b"x" * (9 * 2**20)), "photos.zip")})
    assert_error(response, 413, "too_large", "MAX_UPLOAD_MB")


def test_body_over_max_predict_is_413_without_content_length(fake_app):
    """A chunked body (no Content-Length) is cut off at the limit while it streams."""
    app = fake_app(max_predict_mb=1)
    for content_type, body in (("application/json", big_body(2 * 2**20)),
                               ("multipart/form-data; boundary=b", b"--b\r\n" + b"x" * (2 * 2**20))):
        environ = EnvironBuilder(path=PREDICT, method="POST", content_type=content_type).get_environ()
        # As gunicorn passes a chunked body: no length, and the server marks where the input ends.
        environ.pop("CONTENT_LENGTH", None)
        environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True})
        app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
        assert status.startswith("413"), (content_type, status, b"".join(app_iter))
        assert json.loads(b"".join(app_iter))["error"]["code"] == "too_large"


def test_too_many_form_parts_is_413(fake_app):
    client = fake_app().test_client()
    response = client.post(PREDICT, data={f"field{i}": "x" for i in range(300)}, content_type="multipart/form-data")
    assert_error(response, 413, "too_large", "form parts")


def test_overloaded_runtime_is_503_with_retry_after(fake_app, digit_pngs):
    from tests.service.conftest import FakeRuntime
    from training.errors import Overloaded

    overloaded = Overloaded("prediction queue is full, retry shortly", retry_after=2)
    client = fake_app(FakeRuntime(error=overloaded)).test_client()
    response = client.post(PREDICT, data=files(next(iter(digit_pngs.values()))))
    assert_error(response, 503, "overloaded", "queue is full")
    assert response.headers["Retry-After"] == "2"


def test_missing_weights_is_503(fake_app, digit_pngs):
    from tests.service.conftest import FakeRuntime
    from training.errors import WeightsError

    client = fake_app(FakeRuntime(error=WeightsError("place vgg19.h5 in /keras"))).test_client()
    assert_error(client.post(PREDICT, data=files(b"x")), 503, "unavailable", "vgg19.h5")


def test_unexpected_error_is_500_without_internals_and_logged(fake_app, log_lines):
    from tests.service.conftest import FakeRuntime

    lines = log_lines("service.errors")
    client = fake_app(FakeRuntime(error=RuntimeError("secret internal detail"))).test_client()
    response = client.post(PREDICT, data=files(b"x"), headers={"X-Request-ID": "req-42"})
    error = assert_error(response, 500, "internal_error", "req-42")
    assert "secret" not in error["message"]
    assert response.headers["X-Request-ID"] == "req-42"
    [line] = lines
    logged = json.loads(line)
    assert logged["level"] == "ERROR" and "req-42" in logged["message"]
    assert "secret internal detail" in logged["exception"]


def test_runtime_receives_the_decoded_arguments(fake_app, digit_pngs):
    from tests.service.conftest import FakeRuntime

    runtime = FakeRuntime()
    client = fake_app(runtime).test_client()
    client.post(f"{PREDICT}?top_k=5&version=2", json=b64_body(*digit_pngs.values()))
    client.post("/v1/predict?models=a, b,a", data=files(b"x", b"y"))
    assert runtime.calls[0] == ("predict", MODEL, len(digit_pngs), 2, 5)
    assert runtime.calls[1] == ("predict_many", ("a", "b"), 2, 3)


def test_bad_input_is_answered_without_building_the_runtime(fake_app):
    app = fake_app()
    app.extensions["runtime"].set(None)  # as in a fresh worker
    response = app.test_client().post(PREDICT, json={"instances": [{"b64": "!!"}]})
    assert_error(response, 400, "bad_request", "base64")
    assert app.extensions["runtime"].current() is None
