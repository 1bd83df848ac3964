"""Head training on features, and the backbone it sits on."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.backbone import BackboneSpec, build_backbone, weights_id
from training.errors import Cancelled, WeightsError
from training.evaluate import evaluate, summary_scores
from training.head import OPTIMIZERS, HeadParams, HeadPool, balanced_class_weights, head_probabilities, train_head


def blobs(n_per_class=(40, 40, 40), dim=16, seed=0, offset=500.0, scale=80.0):
    """Separable raw features with a large offset and scale, as backbone features have."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(n_per_class), dim)) * 3
    x = np.concatenate([centers[c] + rng.normal(size=(n, dim)) for c, n in enumerate(n_per_class)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    order = rng.permutation(len(y))
    return (x[order] * scale + offset).astype(np.float32), y[order]


def test_head_learns_raw_features_and_standardizes_inside():
    x, y = blobs()
    model, history = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=30))
    probabilities = model.predict(x[90:], verbose=0)
    assert evaluate(probabilities, y[90:], ["a", "b", "c"])["accuracy"] >= 0.95
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "val_top_k_accuracy"} <= set(history)
    assert model.get_layer("standardize") is not None


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(optimizer):
    x, y = blobs()
    model, history = train_head(x[:90], y[:90], x[90:], y[90:], 3,
                                HeadParams(optimizer=optimizer, epochs=3, hidden_units=0))
    assert len(history["loss"]) == 3
    assert np.isfinite(history["loss"]).all()


def test_progress_is_reported_every_epoch():
    x, y = blobs()
    reports = []
    train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=4, patience=10), progress=reports.append)
    assert [(r.phase, r.epoch, r.total) for r in reports] == [("head", e, 4) for e in range(1, 5)]
    assert "val_accuracy" in reports[-1].metrics


def test_cancel_stops_within_one_epoch():
    x, y = blobs()
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # true during the first epoch

    reports = []
    with pytest.raises(Cancelled):
        train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=50, batch_size=8),
                   progress=reports.append, cancel=cancel)
    assert len(reports) <= 1


def test_early_stopping_restores_the_best_epoch():
    x, y = blobs(offset=0, scale=1)
    y_noise = np.random.default_rng(1).integers(0, 3, len(y))  # unlearnable labels: val loss rises
    model, history = train_head(x[:90], y_noise[:90], x[90:], y_noise[90:], 3,
                                HeadParams(epochs=200, patience=3, learning_rate=0.1))
    assert len(history["val_loss"]) < 200
    best = int(np.argmin(history["val_loss"]))
    assert best < len(history["val_loss"]) - 1  # it stopped after later, worse epochs
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    restored = summary_scores(head_probabilities(model, x[90:]), y_noise[90:])["loss"] + penalty
    assert restored == pytest.approx(history["val_loss"][best], rel=1e-4)


def test_balanced_class_weights():
    weights = balanced_class_weights(np.array([0] * 30 + [1] * 10), 3)
    assert weights[1] == pytest.approx(3 * weights[0])
    assert weights[2] == 1.0  # absent class: neutral


@pytest.mark.parametrize("field,value", [("optimizer", "lbfgs"), ("dropout", 1.0), ("epochs", 0),
                                         ("learning_rate", -1.0), ("hidden_units", -1)])
def test_bad_head_params_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        HeadParams(**{field: value})


def test_random_backbone_is_the_same_in_every_build():
    spec = BackboneSpec("none", "avg", 32)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32) * 50
    first, second = build_backbone(spec), build_backbone(spec)
    np.testing.assert_array_equal(first.features(pixels), second.features(pixels))
    assert first.features(pixels).shape == (2, 512)
    assert first.id == "vgg19-random0-avg-32px-p1-float32"


def test_backbone_spec_checks_arguments():
    with pytest.raises(ValueError, match="feature_layer"):
        BackboneSpec("none", "fc1", 224)
    with pytest.raises(ValueError, match="image_size"):
        BackboneSpec("none", "avg", 16)
    with pytest.raises(ValueError, match="fc2"):
        BackboneSpec("none", "fc2", 64)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        weights_id(str(tmp_path / "nope.h5"))


def test_failed_imagenet_download_names_the_file_and_the_setting(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: None -- offline")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        build_backbone(BackboneSpec("imagenet", "avg", 32), keras_home=tmp_path)
    message = info.value.message
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "models") in message and "BACKBONE_WEIGHTS" in message
    assert "\n" not in message


def test_weights_file_is_loaded_and_named_by_content(tmp_path):
    spec = BackboneSpec("none", "avg", 32)
    source = build_backbone(spec)
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.weights.h5"
    source.model.save_weights(path)
    loaded = build_backbone(BackboneSpec(str(path), "avg", 32))
    assert loaded.weights_id.startswith("file")
    pixels = np.ones((1, 32, 32, 3), np.float32)
    np.testing.assert_allclose(loaded.features(pixels), source.features(pixels), rtol=1e-6)


def weights_of(model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


needs_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                      reason="heads are pooled under TensorFlow only (the others do not trace)")


@needs_tensorflow
@pytest.mark.parametrize("repeated_dataset", [True, False], ids=["small features", "large features"])
def test_a_reused_head_trains_exactly_as_a_fresh_one(repeated_dataset, monkeypatch):
    if not repeated_dataset:
        monkeypatch.setattr("training.head.REPEATED_DATASET_BYTES", 0)
    x, y = blobs()
    params = HeadParams(epochs=6, patience=6)
    pool = HeadPool()
    fresh, fresh_history = train_head(x[:90], y[:90], x[90:], y[90:], 3, params, pool=pool)
    pool.give_back(fresh)
    shifted = x * 1.5 + 7  # other features: the reused head must standardize for them, not the first run's
    other, other_history = train_head(shifted[:90], y[:90], shifted[90:], y[90:], 3, params, pool=pool)
    assert other is fresh and pool.reused == 1
    other_probabilities = head_probabilities(other, shifted[90:])
    built, built_history = train_head(shifted[:90], y[:90], shifted[90:], y[90:], 3, params, pool=None)
    assert other_history == built_history
    np.testing.assert_array_equal(other_probabilities, head_probabilities(built, shifted[90:]))
    pool.give_back(other)
    again, again_history = train_head(x[:90], y[:90], x[90:], y[90:], 3, params, pool=pool)
    assert again is fresh and pool.reused == 2
    assert again_history == fresh_history
    first = train_head(x[:90], y[:90], x[90:], y[90:], 3, params, pool=None)[0]
    for reused, built in zip(weights_of(again), weights_of(first), strict=True):
        np.testing.assert_array_equal(reused, built)


@needs_tensorflow
def test_the_pool_lends_a_head_to_one_run_at_a_time_and_only_for_its_shape():
    x, y = blobs()
    pool = HeadPool(max_idle=1)
    model, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2), pool=pool)
    pool.give_back(model)
    wider, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2, hidden_units=64), pool=pool)
    assert wider is not model and pool.reused == 0  # another shape: built anew
    borrowed, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2), pool=pool)
    assert borrowed is model
    second, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2), pool=pool)
    assert second is not model  # still lent to the run above
    pool.give_back(borrowed)
    pool.give_back(second)  # over max_idle: the older one goes
    assert pool.take(next(iter(pool._idle))) is second


def test_other_backends_build_every_head_anew():
    x, y = blobs()
    pool = HeadPool()
    model, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2), pool=pool)
    pool.give_back(model)
    again, _ = train_head(x[:90], y[:90], x[90:], y[90:], 3, HeadParams(epochs=2), pool=pool)
    assert (again is model) == (keras.backend.backend() == "tensorflow")
