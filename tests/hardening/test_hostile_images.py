"""Hostile and odd images: through predict and the standard protocols (in-process), and the shared decoder.

Broken images get 400, non-images 415, sizes over the pixel limit 400 before any pixel is
decoded; odd but valid images (CMYK, 16-bit, palette with transparency, LA, 10,000 GIF
frames, EXIF rotation) get a prediction.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from PIL import Image

from service.open_inference import serialize_bytes
from tests.hardening import corpus
from tests.hardening.send import send_wsgi
from training.images import preprocess_image

CASES = corpus.image_cases()
IMAGE_SIZE = 32  # the test model's input size


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_image_over_http(app, tally, case):
    status, body = send_wsgi(app, case.request)
    problems = corpus.check_answer(case, status, body)
    tally.add("images/http", problems, case.id)
    assert not problems, problems


def protocol_requests(case: corpus.Case) -> dict[str, corpus.Request]:
    """The case's image as the Open Inference Protocol's binary BYTES tensor and as TF Serving's b64 instance."""
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(case.data) + 4}}]}).encode()
    v2 = corpus.Request("POST", f"/v2/models/{corpus.MODEL}/infer", header + serialize_bytes([case.data]),
                        "application/octet-stream", headers={"Inference-Header-Content-Length": str(len(header))})
    tfserving = corpus.Request("POST", f"/v1/models/{corpus.MODEL}:predict", json.dumps(
        {"instances": [{"b64": base64.b64encode(case.data).decode()}]}).encode(), "application/json")
    return {"v2": v2, "tfserving": tfserving}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_image_over_the_standard_protocols(app, tally, case):
    """The same status and reason as v1, in the protocols' error shape; a valid image gets probabilities."""
    problems = []
    for protocol, request in protocol_requests(case).items():
        status, body = send_wsgi(app, request)
        problems += [f"{protocol}: {problem}" for problem in corpus.check_protocol_answer(case, status, body)]
    tally.add("images/protocols", problems, case.id)
    assert not problems, problems


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_image_through_the_decoder(tally, case):
    try:
        pixels = preprocess_image(case.data, IMAGE_SIZE, corpus.MAX_IMAGE_PIXELS)
    except Exception as exc:  # noqa: BLE001 - any type is an answer to check
        problems = corpus.check_raised(case, exc)
    else:
        problems = corpus.check_raised(case, None)
        if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            problems.append(f"shape {pixels.shape}")
    tally.add("images/library", problems, case.id)
    assert not problems, problems


def predict(app, data: bytes, name: str) -> dict:
    body, content_type = corpus.multipart([("image", name, data)])
    status, answer = send_wsgi(app, corpus.Request("POST", corpus.PREDICT, body, content_type))
    assert status == 200, answer
    return json.loads(answer)["predictions"][0]


def test_exif_rotated_jpeg_predicts_like_the_upright_one(app, small_digits_dir):
    digit = Image.open(sorted(small_digits_dir.glob("*/*.png"))[0]).convert("RGB")
    upright = digit.resize((64, 48))  # not square: a missed rotation would also squash it differently
    straight = predict(app, corpus.upright_jpeg(upright), "upright.jpg")
    rotated = predict(app, corpus.exif_rotated_jpeg(upright), "rotated.jpg")
    assert rotated["label"] == straight["label"]
    for a, b in zip(straight["top_k"], rotated["top_k"], strict=True):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=0.02)


def test_ten_thousand_frame_gif_is_quick(app, tally):
    gif = next(case.data for case in CASES if case.name == "10000-frames.gif")
    predict(app, corpus.encode(corpus.noise(32, 1), "PNG"), "warm.png")  # model loaded: time only the GIF
    start = time.perf_counter()
    predict(app, gif, "frames.gif")
    seconds = time.perf_counter() - start
    tally.extra["gif_10000_frames_ms"] = round(seconds * 1000, 1)
    assert seconds < 2.0, f"a 10,000-frame GIF took {seconds:.2f} s"


def test_service_is_healthy_after_the_images(app):
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    predict(app, corpus.encode(corpus.noise(32, 2), "PNG"), "after.png")
