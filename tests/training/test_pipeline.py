"""Whole training runs: real data end to end, the feature cache, cancel, fine-tune, the saved version."""

from __future__ import annotations

import dataclasses
import json
import shutil

import keras
import numpy as np
import pytest

from training.backbone import BackboneSpec, shared_backbone
from training.data.ingest import ingest
from training.errors import Cancelled, DatasetError
from training.features import FeatureCache
from training.head import HEADS
from training.options import parse_options
from training.pipeline import train
from training.predict import evaluate_dataset, load_version, predict_files
from training.store import ModelStore

FAST = {"image_size": 32, "epochs": 5, "patience": 5}


@pytest.mark.slow
def test_digits_end_to_end_reaches_85_percent(digits_dir, settings):
    reports = []
    result = train(digits_dir, "digits", settings, parse_options({"image_size": 32}), progress=reports.append)

    assert result.metrics["accuracy"] >= 0.85, result.metrics["accuracy"]
    assert result.version == 1 and result.published
    assert result.features_computed == result.dataset["images"] == 1797
    assert result.dataset["val_images"] == pytest.approx(1797 * 0.2, abs=1)
    phases = [r.phase for r in reports]
    for phase in ("ingest", "features", "head", "evaluate", "save"):
        assert phase in phases
    assert phases.index("features") < phases.index("head") < phases.index("evaluate") < phases.index("save")

    folder = settings.model_dir / "digits" / "1"
    for name in ("head.keras", "labels.json", "metadata.json", "plots/training.png", "plots/confusion_matrix.png"):
        assert (folder / name).is_file(), name
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["kind"] == "head"
    assert metadata["classes"] == sorted(metadata["classes"]) and len(metadata["classes"]) == 10
    assert metadata["backbone"]["id"] == "vgg19-random0-avg-32px-p1-float32"
    assert metadata["backbone"]["precision"] == "float32"
    assert metadata["dataset"]["images"] == 1797 and metadata["dataset"]["id"] == result.dataset["id"]
    assert {"keras", "numpy", "pillow", "opencv"} <= set(metadata["library_versions"])
    assert metadata["params"]["head"]["optimizer"] == "nesterov"
    assert len(metadata["metrics"]["confusion_matrix"]) == 10
    assert set(metadata["metrics"]["per_class"]["three"]) == {"precision", "recall", "f1", "support"}
    assert metadata["training_seconds"] > 0 and "created" in metadata

    # Offline predictions of the stored model agree with the accuracy it recorded.
    scored = evaluate_dataset(settings, "digits", digits_dir)
    assert scored["accuracy"] >= result.metrics["accuracy"] - 0.05
    images = sorted((digits_dir / "seven").glob("*.png"))[:20]
    model, answers = predict_files(settings, "digits", images, top_k=3)
    assert model.version == 1
    assert sum(a["label"] == "seven" for a in answers) >= 16
    assert all(len(a["top_k"]) == 3 and a["top_k"][0]["label"] == a["label"] for a in answers)


def copy_dataset(source, dest, per_class: int):
    for folder in sorted(source.iterdir()):
        (dest / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(image, dest / folder.name / image.name)


def test_retraining_computes_only_new_images(small_digits_dir, settings, tmp_path):
    data = tmp_path / "data-set"
    copy_dataset(small_digits_dir, data, per_class=8)
    params = parse_options(FAST)
    first = train(data, "cache", settings, params)
    assert first.features_computed == 24
    reused = HEADS.reused
    again = train(data, "cache", settings, params)
    assert again.features_computed == 0
    pooled = keras.backend.backend() == "tensorflow"  # the head the first run gave back, its train step traced
    assert HEADS.reused == reused + pooled
    assert again.metrics == first.metrics and again.history == first.history  # and it trains as a fresh one
    copy_dataset(small_digits_dir, tmp_path / "more", per_class=12)
    superset = train(tmp_path / "more", "cache", settings, params)
    assert superset.features_computed == 12  # only the four new images per class
    assert ModelStore(settings.model_dir).versions("cache") == [1, 2, 3]


def test_a_head_prepared_beside_the_features_trains_as_one_built_after_them(small_digits_dir, settings, tmp_path,
                                                                          monkeypatch):
    params = parse_options(FAST)
    HEADS.clear()
    reused = HEADS.reused
    prepared = train(small_digits_dir, "prepared", settings, params)
    pooled = keras.backend.backend() == "tensorflow"
    assert HEADS.reused == reused + pooled  # train_head took the head traced beside the backbone
    HEADS.clear()
    monkeypatch.setattr("training.pipeline.prepare_head", lambda *args: None)
    built = train(small_digits_dir, "built", dataclasses.replace(settings, data_dir=tmp_path / "other"), params)
    assert prepared.features_computed == built.features_computed == 36
    assert prepared.metrics == built.metrics and prepared.history == built.history


def test_cached_features_equal_fresh_ones(small_digits_dir, settings, tmp_path):
    params = parse_options(FAST)
    train(small_digits_dir, "a", settings, params)
    other = dataclasses.replace(settings, data_dir=tmp_path / "other-data")
    train(small_digits_dir, "a", other, params)
    hashes = [item.sha256 for item in ingest(small_digits_dir, tmp_path / "dataset").items]
    caches = [FeatureCache(s.feature_cache_dir, folder.name, 512) for s in (settings, other)
              for folder in s.feature_cache_dir.iterdir()]
    first, second = (cache.lookup(hashes) for cache in caches)
    assert len(caches) == 2 and sorted(first) == sorted(second) == sorted(hashes) and len(hashes) == 36
    for sha256 in hashes:
        np.testing.assert_allclose(first[sha256], second[sha256], rtol=1e-5, atol=1e-5)


def test_cancel_during_features_writes_nothing(small_digits_dir, settings):
    reports = []

    def cancel():
        return any(r.phase == "features" and r.current > 0 for r in reports)

    params = dataclasses.replace(parse_options(FAST), feature_batch_size=8)
    with pytest.raises(Cancelled):
        train(small_digits_dir, "stopped", settings, params, progress=reports.append, cancel=cancel)
    done = [r.current for r in reports if r.phase == "features"]
    assert max(done) == 8  # stopped after one batch of eight
    assert ModelStore(settings.model_dir).versions("stopped") == []
    assert not list((settings.data_dir / "tmp").iterdir())  # the work folder (unpacked archive) removed


def test_cancel_during_head_training_writes_nothing(small_digits_dir, settings):
    reports = []

    def cancel():
        return any(r.phase == "head" for r in reports)

    with pytest.raises(Cancelled):
        train(small_digits_dir, "stopped", settings, parse_options(FAST | {"epochs": 40}),
              progress=reports.append, cancel=cancel)
    assert [r.epoch for r in reports if r.phase == "head"] == [1]
    assert ModelStore(settings.model_dir).versions("stopped") == []


def test_fine_tune_saves_a_whole_model_and_leaves_the_shared_backbone_frozen(small_digits_dir, settings):
    spec = BackboneSpec("none", "avg", 32)
    backbone = shared_backbone(spec, settings.keras_home)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32) * 50
    before = backbone.features(pixels)

    params = parse_options(FAST | {"fine_tune": True, "fine_tune_epochs": 2, "unfreeze_blocks": 2,
                                   "fine_tune_keep": "always"})
    result = train(small_digits_dir, "tuned", settings, params)

    metadata = ModelStore(settings.model_dir).metadata("tuned", result.version)
    assert metadata["kind"] == "full"
    assert metadata["fine_tune"]["kept"] is True
    assert 0 <= metadata["fine_tune"]["head_accuracy"] <= 1
    assert (settings.model_dir / "tuned" / "1" / "model.keras").is_file()
    assert (settings.model_dir / "tuned" / "1" / "plots" / "fine_tune.png").is_file()
    assert {"block5_conv1", "block4_conv4"} <= set(metadata["backbone"]["fine_tuned_layers"])
    assert "block3_conv1" not in metadata["backbone"]["fine_tuned_layers"]
    assert len(result.history["fine_tune"]["loss"]) >= 1
    np.testing.assert_array_equal(backbone.features(pixels), before)
    assert backbone.model.trainable is False

    loaded = load_version(ModelStore(settings.model_dir), "tuned")
    assert loaded.kind == "full"
    _, answers = predict_files(settings, "tuned", sorted((small_digits_dir / "one").glob("*.png"))[:3])
    assert all(a["label"] in ("zero", "one", "two") for a in answers)


def test_a_fine_tune_that_does_not_beat_the_head_keeps_the_head(small_digits_dir, settings):
    # Random VGG19 weights make fine-tuning unstable: a learning rate this high ruins the
    # features, so the run must fall back to the head it trained first.
    params = parse_options(FAST | {"epochs": 20, "fine_tune": True, "fine_tune_epochs": 1,
                                   "fine_tune_learning_rate": 0.5, "augment": False})
    result = train(small_digits_dir, "fallback", settings, params)
    metadata = ModelStore(settings.model_dir).metadata("fallback", result.version)
    report = metadata["fine_tune"]
    assert report["kept"] is False and report["fine_tuned_accuracy"] <= report["head_accuracy"]
    assert metadata["kind"] == "head" and metadata["backbone"]["fine_tuned_layers"] == []
    assert result.metrics["accuracy"] == report["head_accuracy"]
    assert (settings.model_dir / "fallback" / "1" / "head.keras").is_file()


def test_split_folders_are_used_as_given(small_digits_dir, settings, tmp_path):
    data = tmp_path / "split"
    for label_dir in small_digits_dir.iterdir():
        images = sorted(label_dir.glob("*.png"))
        for split, chosen in (("train", images[:9]), ("val", images[9:])):
            (data / split / label_dir.name).mkdir(parents=True)
            for image in chosen:
                shutil.copy(image, data / split / label_dir.name / image.name)
    result = train(data, "split", settings, parse_options(FAST))
    assert result.dataset["train_images"] == 27 and result.dataset["val_images"] == 9
    assert result.dataset["split"] == "folders"


def test_too_few_images_names_the_class(small_digits_dir, settings, tmp_path):
    data = tmp_path / "few"
    copy_dataset(small_digits_dir, data, per_class=12)
    for image in sorted((data / "two").glob("*.png"))[3:]:
        image.unlink()
    with pytest.raises(DatasetError, match="two"):
        train(data, "few", settings, parse_options(FAST))
    assert ModelStore(settings.model_dir).versions("few") == []


def test_options_are_checked_by_name():
    with pytest.raises(ValueError, match="epochs"):
        parse_options({"epochs": "many"})
    with pytest.raises(ValueError, match="unknown training option"):
        parse_options({"epoch": 3})
    with pytest.raises(ValueError, match="fine_tune"):
        parse_options({"fine_tune_epochs": 3})
    params = parse_options({"epochs": "7", "fine_tune": "true", "augment": "false", "learning_rate": "0.05"})
    assert params.head.epochs == 7 and params.head.learning_rate == 0.05
    assert params.fine_tune is not None and params.fine_tune.augment is False
