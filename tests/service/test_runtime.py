"""The prediction runtime and its micro-batcher, on real tiny models."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import MicroBatcher, own_copy, padded, padded_sizes
from service.errors import http_headers, http_status
from service.runtime import ModelRuntime
from tests.live import ROOT
from training.backbone import bfloat16_supported
from training.demo import write_digits_dataset
from training.errors import (
    ImageError,
    ModelNotFoundError,
    ModelUnavailable,
    Overloaded,
    PredictTimeout,
    StoreFullError,
    UnsupportedImageError,
)
from training.options import parse_options
from training.pipeline import train
from training.predict import predict_files
from training.settings import Settings

# --- micro-batcher ----------------------------------------------------------------------------------------------


def test_concurrent_requests_get_their_own_answers_in_shared_batches():
    sizes = []

    def forward(rows):
        sizes.append(len(rows))
        time.sleep(0.01)
        return rows * 2

    batcher = MicroBatcher(forward, max_batch_size=16, max_wait_ms=20, max_queue_rows=1000)
    try:
        with ThreadPoolExecutor(32) as pool:
            inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(64)]
            outputs = list(pool.map(batcher.submit, inputs))
    finally:
        batcher.close()
    for rows, out in zip(inputs, outputs):
        np.testing.assert_array_equal(out, rows * 2)
    assert max(sizes) > 1 and max(sizes) <= 16
    assert len(sizes) < 64


def test_an_oversized_request_is_split_into_max_size_forwards():
    sizes = []
    batcher = MicroBatcher(lambda rows: sizes.append(len(rows)) or rows + 1, max_batch_size=4, max_wait_ms=0)
    try:
        out = batcher.submit(np.arange(10, dtype=np.float32)[:, None])
    finally:
        batcher.close()
    assert sizes == [4, 4, 2]
    np.testing.assert_array_equal(out[:, 0], np.arange(10) + 1)


def test_a_full_queue_answers_overloaded_at_once():
    release = threading.Event()

    def slow(rows):
        release.wait(10)
        return rows

    batcher = MicroBatcher(slow, max_batch_size=1, max_wait_ms=0, max_queue_rows=2)
    pool = ThreadPoolExecutor(4)
    try:
        running = pool.submit(batcher.submit, np.zeros((1, 1)))  # taken by the worker, blocked in forward
        time.sleep(0.1)
        queued = [pool.submit(batcher.submit, np.zeros((1, 1))) for _ in range(2)]
        time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            batcher.submit(np.zeros((1, 1)))
        assert time.monotonic() - started < 0.05
        assert http_status(info.value) == (503, "overloaded") and http_headers(info.value) == {"Retry-After": "1"}
        release.set()
        assert running.result(5).shape == (1, 1)
        assert all(f.result(5).shape == (1, 1) for f in queued)
    finally:
        release.set()
        pool.shutdown()
        batcher.close()


def test_a_failing_forward_fails_its_batch_and_the_thread_lives_on():
    calls = []

    def flaky(rows):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return rows

    batcher = MicroBatcher(flaky, max_batch_size=4, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.submit(np.zeros((1, 1)))
        assert batcher.submit(np.ones((1, 1)))[0, 0] == 1
    finally:
        batcher.close()


def test_each_waiter_gets_its_own_error_and_the_next_request_succeeds():
    """One failing forward fails every request of its batch, each with its own exception object."""
    gate, calls = threading.Event(), []

    def forward(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            gate.wait(5)
            return rows
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return rows

    batcher = MicroBatcher(forward, max_batch_size=8, max_wait_ms=50)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.submit, np.zeros((1, 1)))  # holds the thread in forward
            time.sleep(0.1)
            waiting = [pool.submit(batcher.submit, np.zeros((1, 1))) for _ in range(3)]  # one batch of three
            time.sleep(0.1)
            gate.set()
            first.result(5)
            errors = [f.exception(5) for f in waiting]
        assert calls[:2] == [1, 3]
        assert all(isinstance(e, RuntimeError) and "device lost" in str(e) for e in errors)
        assert len({id(e) for e in errors}) == 3
        assert batcher.submit(np.ones((2, 1))).tolist() == [[1.0], [1.0]]
    finally:
        gate.set()
        batcher.close()


def test_a_failing_on_batch_hook_fails_its_batch_and_the_thread_lives_on():
    hook_calls = []

    def on_batch(rows, queued):
        hook_calls.append(rows)
        if len(hook_calls) == 1:
            raise ValueError("metrics backend down")

    batcher = MicroBatcher(lambda rows: rows * 3, max_batch_size=4, max_wait_ms=0, on_batch=on_batch)
    try:
        with pytest.raises(ValueError, match="metrics backend down"):
            batcher.submit(np.ones((1, 1)))
        assert batcher.submit(np.ones((1, 1)))[0, 0] == 3
        assert batcher.problem() is None
    finally:
        batcher.close()


def test_a_forward_that_never_returns_times_out_and_is_reported():
    hang = threading.Event()
    batcher = MicroBatcher(lambda rows: hang.wait(60) and rows, max_batch_size=1, max_wait_ms=0, timeout_s=0.5,
                           name="backbone-test")
    try:
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(batcher.submit, np.zeros((1, 1)))
            time.sleep(0.1)
            queued = pool.submit(batcher.submit, np.zeros((1, 1)))
            for future in (stuck, queued):
                with pytest.raises(PredictTimeout) as info:
                    future.result(5)
                assert http_status(info.value) == (503, "timeout") and http_headers(info.value) == {"Retry-After": "5"}
                assert "PREDICT_TIMEOUT_S" in info.value.message
        assert batcher._queued_rows == 0  # the timed-out request left the queue
        time.sleep(0.2)
        problem = batcher.problem()
        assert problem and "backbone-test" in problem and "forward pass" in problem
        started = time.monotonic()
        with pytest.raises(ModelUnavailable, match="forward pass") as info:  # fails fast while the forward is hung
            batcher.submit(np.zeros((1, 1)))
        assert http_status(info.value) == (503, "unavailable") and info.value.retry_after == 5
        assert time.monotonic() - started < 0.1
        hang.set()  # the forward returns: the batcher answers again
        time.sleep(0.1)
        assert batcher.problem() is None
        assert batcher.submit(np.ones((1, 1)))[0, 0] == 1
    finally:
        hang.set()
        batcher.close()


def test_a_stopped_batching_thread_is_reported_and_refuses_work():
    batcher = MicroBatcher(lambda rows: rows, max_wait_ms=0, name="model-x-1")
    with batcher._cond:  # stop the thread as a crash would, without closing the batcher
        batcher._closed = True
        batcher._cond.notify_all()
    batcher._thread.join(5)
    batcher._closed = False
    assert "model-x-1 has stopped" in batcher.problem()
    with pytest.raises(ModelUnavailable, match="stopped"):
        batcher.submit(np.zeros((1, 1)))


def test_padded_sizes_are_powers_of_two_up_to_the_batch_bound():
    assert padded_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert padded_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert padded_sizes(2) == (1, 2) and padded_sizes(1) == (1,)


def test_padded_batches_reach_the_model_in_few_sizes_and_answer_only_real_rows():
    shapes = []

    def forward(rows):
        shapes.append(len(rows))
        return rows.sum(axis=1, keepdims=True) * 2

    batcher = MicroBatcher(padded(forward, padded_sizes(16)), max_batch_size=16, max_wait_ms=0)
    try:
        rng = np.random.default_rng(0)
        requests = [rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 3, 5, 7, 11, 16, 2)]
        for rows in requests:
            np.testing.assert_allclose(batcher.submit(rows), rows.sum(axis=1, keepdims=True) * 2, rtol=1e-6)
    finally:
        batcher.close()
    assert shapes == [1, 4, 8, 8, 16, 16, 2]


def test_own_copy_keeps_the_type_and_message_and_chains_the_original():
    original = ImageError("image 3: truncated")
    clone = own_copy(original)
    assert type(clone) is ImageError and clone is not original and clone.message == original.message
    assert clone.__cause__ is original
    odd = StoreFullError("disk full", 28)  # a constructor with other arguments: a RuntimeError naming it
    assert isinstance(own_copy(odd), RuntimeError) and "StoreFullError: disk full" in str(own_copy(odd))


def test_the_runtime_and_batcher_import_no_flask():
    # They raise library errors; only the HTTP layer knows statuses (a worker or script can serve without Flask).
    code = ("import sys, service.runtime, service.batching, service.model_cache; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'werkzeug')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- runtime on real models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two head-only models on the same 32 px backbone, trained on real digits."""
    root = tmp_path_factory.mktemp("runtime")
    data = root / "digits"
    write_digits_dataset(data, image_size=32, per_class=12, classes=3)
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        max_batch_wait_ms=2)
    params = parse_options({"image_size": 32, "epochs": 5})
    train(data, "digits", settings, params)
    train(data, "other", settings, parse_options({"image_size": 32, "epochs": 3, "optimizer": "adam"}))
    images = sorted(data.glob("*/*.png"))[::4]
    runtime = ModelRuntime(settings)
    yield settings, runtime, images
    runtime.close()


def test_api_probabilities_equal_offline_predictions(served):
    settings, runtime, images = served
    answer = runtime.predict("digits", [p.read_bytes() for p in images], top_k=3)
    _, offline = predict_files(settings, "digits", images, top_k=3)
    assert answer["model"] == "digits" and answer["version"] == 1
    assert len(answer["predictions"]) == len(images)
    for online, expected in zip(answer["predictions"], offline):
        assert [t["label"] for t in online["top_k"]] == [t["label"] for t in expected["top_k"]]
        for a, b in zip(online["top_k"], expected["top_k"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_concurrent_predictions_are_each_right(served):
    _, runtime, images = served
    expected = {p: runtime.predict("digits", [p.read_bytes()])["predictions"][0]["label"] for p in images}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: (p, runtime.predict("digits", [p.read_bytes()])), images * 4))
    for path, answer in answers:
        assert answer["predictions"][0]["label"] == expected[path]


def test_many_models_share_one_backbone_pass(served, monkeypatch):
    _, runtime, images = served
    runtime.predict("digits", [images[0].read_bytes()])  # batcher exists
    batcher = next(served.batcher for served in runtime._cache.values() if served.backbone is not None)
    calls = []
    original = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda rows: calls.append(len(rows)) or original(rows))
    result = runtime.predict_many(["digits", "other"], [p.read_bytes() for p in images[:3]])
    assert [r["model"] for r in result["results"]] == ["digits", "other"]
    assert calls == [3]
    single = runtime.predict("other", [p.read_bytes() for p in images[:3]])
    assert single["predictions"] == result["results"][1]["predictions"]


def test_a_new_published_version_is_served_without_restart(served):
    settings, runtime, images = served
    before = runtime.predict("digits", [images[0].read_bytes()])
    data = images[0].parent.parent
    version = train(data, "digits", settings, parse_options({"image_size": 32, "epochs": 2, "publish": "always"}))
    after = runtime.predict("digits", [images[0].read_bytes()])
    assert after["version"] == version.version != before["version"]
    runtime.store.publish("digits", before["version"])  # roll back
    assert runtime.predict("digits", [images[0].read_bytes()])["version"] == before["version"]
    assert runtime.predict("digits", [images[0].read_bytes()], version=version.version)["version"] == version.version


def test_bad_images_name_their_position(served):
    _, runtime, images = served
    with pytest.raises(UnsupportedImageError, match="image 1"):
        runtime.predict("digits", [images[0].read_bytes(), b"%PDF-1.4 not an image"])
    with pytest.raises(ImageError, match="image 0: empty"):
        runtime.predict("digits", [b""])
    with pytest.raises(ModelNotFoundError):
        runtime.predict("nope", [images[0].read_bytes()])
    with pytest.raises(ModelNotFoundError):
        runtime.predict("digits", [images[0].read_bytes()], version=99)


def test_serve_precision_bfloat16_agrees_with_float32(served):
    """SERVE_PRECISION=bfloat16 serves a float32-trained head on bfloat16 features (where the CPU has it)."""
    settings, runtime, images = served
    import dataclasses

    fast = ModelRuntime(dataclasses.replace(settings, serve_precision="bfloat16"))
    try:
        data = [p.read_bytes() for p in images]
        reference = runtime.predict("digits", data)["predictions"]
        reduced = fast.predict("digits", data)["predictions"]
        backbones = [served.backbone for served in fast._cache.values() if served.backbone is not None]
    finally:
        fast.close()
    agree = np.mean([a["label"] == b["label"] for a, b in zip(reference, reduced)])
    assert agree >= 0.9, agree
    assert [b.precision for b in backbones] == ["bfloat16" if bfloat16_supported() else "float32"]


def test_padded_forward_passes_answer_what_unpadded_ones_do(served):
    settings, runtime, images = served
    import dataclasses

    padding = ModelRuntime(dataclasses.replace(settings, pad_batches="on"))
    try:
        data = [p.read_bytes() for p in images[:5]]
        _, expected = runtime.scores("digits", data)
        model, answered = padding.scores("digits", data)
        keras_model = next(s.backbone.model for s in padding._cache.values() if s.backbone is not None)
        shapes = []
        original = keras_model.predict_on_batch
        keras_model.predict_on_batch = lambda rows: shapes.append(len(rows)) or original(rows)
        padding.scores("digits", data[:3])
    finally:
        padding.close()
    np.testing.assert_allclose(answered, expected, atol=1e-5)
    assert shapes == [4]  # three images, padded to four


def test_readiness_reports_each_component(served, tmp_path):
    _, runtime, _ = served
    assert runtime.readiness() == {"backbone": "ok", "batching": "ok"}
    broken = ModelRuntime(Settings(model_dir=tmp_path / "absent", backbone_weights=str(tmp_path / "w.h5")))
    assert "not found" in broken.readiness()["backbone"]
    broken.close()


def test_a_forward_pass_is_bounded_by_pixels_as_well_as_images(served):
    """MAX_BATCH_PIXELS: large images go through in smaller batches, and a request is decoded piece by piece."""
    import dataclasses

    from service.runtime import RuntimeHooks

    settings, runtime, images = served
    batches = []
    small = ModelRuntime(dataclasses.replace(settings, max_batch_pixels=2 * 32 * 32, max_batch_size=32),
                         RuntimeHooks(on_batch=lambda rows, queued: batches.append(rows)))
    try:
        assert small.rows_per_forward(32) == 2 and small.rows_per_forward(1024) == 1
        assert runtime.rows_per_forward(32) == settings.max_batch_size
        data = [p.read_bytes() for p in images[:5]]
        answer = small.predict("digits", data)["predictions"]
        assert [a["label"] for a in answer] == [a["label"] for a in runtime.predict("digits", data)["predictions"]]
        assert batches and max(batches) <= 2 and sum(batches) == 5
    finally:
        small.close()
