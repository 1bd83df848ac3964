"""The one inference path: `LoadedModel.probabilities`, whatever forward pass it is given."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.ingest import ingest
from training.evaluate import evaluate
from training.features import FeatureCache, extract_features
from training.images import preprocess_image
from training.options import parse_options
from training.pipeline import split_indices, train
from training.predict import backbone_for, file_probabilities, load_version
from training.store import ModelStore


@pytest.fixture
def head_version(small_digits_dir, settings):
    """A head-only version trained on the small digits, loaded back from the store."""
    train(small_digits_dir, "one", settings, parse_options({"image_size": 32, "epochs": 5, "val_split": 0.5}))
    return load_version(ModelStore(settings.model_dir), "one")


def test_pixels_through_an_injected_forward_equal_features_given_directly(head_version, settings, small_digits_dir):
    backbone = backbone_for(head_version, settings)
    paths = sorted(small_digits_dir.glob("*/*.png"))[:10]
    pixels = np.stack([preprocess_image(path.read_bytes(), head_version.image_size) for path in paths])
    calls = []

    def forward(rows: np.ndarray) -> np.ndarray:  # what the service's micro-batched forward stands for
        calls.append(len(rows))
        return backbone.features(rows)

    from_pixels = head_version.probabilities(pixels, forward=forward)
    assert calls == [10]
    np.testing.assert_array_equal(from_pixels, head_version.probabilities(features=backbone.features(pixels)))
    assert from_pixels.shape == (10, 3) and from_pixels.dtype == np.float64
    np.testing.assert_allclose(from_pixels.sum(axis=1), 1, atol=1e-5)
    # In the same batches: the backbone's last bits depend on the batch size on some CPUs (oneDNN on an
    # AVX2-only EPYC rounds a batch of 4 and one of 10 differently, by up to 6e-8).
    in_fours = np.concatenate([head_version.probabilities(pixels[i:i + 4], forward=forward) for i in range(0, 10, 4)])
    np.testing.assert_array_equal(file_probabilities(head_version, paths, backbone.features, batch_size=4), in_fours)
    np.testing.assert_allclose(in_fours, from_pixels, atol=1e-6)


def test_a_head_only_version_needs_features_or_the_backbone_forward(head_version):
    with pytest.raises(ValueError, match="forward"):
        head_version.probabilities(np.zeros((1, 32, 32, 3), np.float32))


def test_the_recorded_metrics_come_from_the_same_method(head_version, settings, small_digits_dir):
    # Training scored its validation images through `probabilities`; the stored version, fed the cached
    # features of those images, gives back exactly the recorded confusion matrix and loss.
    dataset = ingest(small_digits_dir)
    labels = np.array([head_version.classes.index(item.label) for item in dataset.items])
    backbone = backbone_for(head_version, settings)
    cache = FeatureCache(settings.feature_cache_dir, backbone.id, backbone.spec.feature_dim)
    features, computed = extract_features(dataset.items, cache, lambda: backbone, head_version.image_size)
    assert computed == 0  # every image's features were cached by training
    _, val = split_indices(dataset, labels, 0.5, 0)
    recorded = head_version.metadata["metrics"]
    scored = evaluate(head_version.probabilities(features=features[val]), labels[val], head_version.classes)
    assert scored["samples"] == recorded["samples"] == len(val)
    assert scored["confusion_matrix"] == recorded["confusion_matrix"]
    assert scored["loss"] == pytest.approx(recorded["loss"], abs=1e-9)
