"""Shared fixtures: isolated settings and the real digits dataset on disk."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from training.demo import write_digits_dataset  # noqa: E402
from training.settings import Settings  # noqa: E402


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings with a fresh model store and data folder, random backbone weights."""
    return Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", backbone_weights="none",
                    keras_home=tmp_path / "keras")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """scikit-learn's digits as 32 px RGB PNGs in one folder per class (all 1797 images)."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits_dataset(root, image_size=32)
    return root


@pytest.fixture(scope="session")
def small_digits_dir(tmp_path_factory):
    """A small digits dataset: three classes, 12 images each."""
    root = tmp_path_factory.mktemp("small-digits") / "digits"
    write_digits_dataset(root, image_size=32, per_class=12, classes=3)
    return root
