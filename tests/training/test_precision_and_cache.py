"""Precision is part of a backbone's identity and of every version; bfloat16 support is asked of the backend
that runs the model; the feature cache survives torn files; shared backbones follow the weights' content."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from training import backbone as backbone_module
from training.backbone import (
    BackboneSpec,
    accelerator_present,
    backbone_id,
    bfloat16_supported,
    build_backbone,
    clear_shared_backbones,
    cpu_has_bfloat16,
    effective_precision,
    shared_backbone,
)
from training.features import FeatureCache
from training.predict import serving_precision, trained_backbone_id, trained_precision


def test_the_backbone_id_names_the_precision():
    spec = BackboneSpec("none", "avg", 32)
    assert backbone_id(spec, "random0") == "vgg19-random0-avg-32px-p1-float32"
    assert backbone_id(spec, "random0", "bfloat16") == "vgg19-random0-avg-32px-p1-bfloat16"
    with pytest.raises(ValueError, match="received: 'float16'"):
        backbone_id(spec, "random0", "float16")


@pytest.mark.parametrize("backend,module,fake", [
    ("torch", "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))),
    ("jax", "jax", types.SimpleNamespace(devices=lambda: [types.SimpleNamespace(platform="gpu")])),
])
def test_a_gpu_is_found_through_the_backend_that_runs_the_model(monkeypatch, backend, module, fake):
    """The GPU hosts have PyTorch or JAX and no TensorFlow: each backend is asked in its own terms."""
    monkeypatch.setitem(sys.modules, module, fake)
    assert accelerator_present(backend) is True
    cpu_only = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False),
                                     devices=lambda: [types.SimpleNamespace(platform="cpu")])
    monkeypatch.setitem(sys.modules, module, cpu_only)
    assert accelerator_present(backend) is False


def test_a_backend_that_is_not_installed_sees_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax raises ImportError
    assert accelerator_present("jax") is False
    assert accelerator_present("numpy") is False


def test_the_real_backend_answers_on_this_machine():
    """Whichever backend runs the tests (tensorflow in make test, torch in make test-torch) gives an answer."""
    import keras

    backend = keras.backend.backend()
    assert bfloat16_supported() == (accelerator_present(backend) or cpu_has_bfloat16())


def test_cpu_flags_decide_without_a_gpu(tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t: fpu sse2 avx512f avx512_bf16\n")
    assert cpu_has_bfloat16(flags)
    flags.write_text("flags\t: fpu sse2 avx2\n")
    assert not cpu_has_bfloat16(flags)
    assert not cpu_has_bfloat16(tmp_path / "missing")


def test_bfloat16_falls_back_to_float32_only_where_the_hardware_lacks_it(monkeypatch):
    monkeypatch.setattr(backbone_module, "bfloat16_supported", lambda backend=None: False)
    assert effective_precision("bfloat16") == "float32"
    assert effective_precision("float32") == "float32"
    monkeypatch.setattr(backbone_module, "bfloat16_supported", lambda backend=None: True)
    assert effective_precision("bfloat16") == "bfloat16"


class Version:
    def __init__(self, backbone: dict) -> None:
        self.metadata = {"backbone": backbone}


def test_versions_are_served_in_the_precision_they_were_trained_in(settings, monkeypatch):
    import dataclasses

    monkeypatch.setattr(backbone_module, "bfloat16_supported", lambda backend=None: True)
    bf16 = Version({"id": "vgg19-x-avg-32px-p1-bfloat16", "precision": "bfloat16"})
    legacy = Version({"id": "vgg19-x-avg-32px-p1"})  # made before versions recorded their precision
    assert serving_precision(bf16, settings) == "bfloat16"
    assert serving_precision(legacy, settings) == trained_precision(legacy.metadata) == "float32"
    assert trained_backbone_id(legacy.metadata) == "vgg19-x-avg-32px-p1-float32"
    told = dataclasses.replace(settings, serve_precision="float32")
    assert serving_precision(bf16, told) == "float32"


def shard_files(cache: FeatureCache) -> tuple[Path, Path]:
    """The one shard's rows and keys."""
    (keys,) = sorted(cache.root.glob("*.keys"))
    return keys.with_suffix(".npy"), keys


def test_a_torn_or_foreign_shard_is_recomputed_not_trusted(tmp_path):
    cache = FeatureCache(tmp_path, "backbone", feature_dim=4)
    hashes = ["ab" * 32, "cd" * 32]
    cache.add(hashes, np.arange(8, dtype=np.float32).reshape(2, 4))
    found = cache.lookup([*hashes, "ef" * 32])
    assert sorted(found) == hashes and found[hashes[1]].tolist() == [4, 5, 6, 7]
    rows, keys = shard_files(cache)
    intact = rows.read_bytes()
    for damaged in (b"", intact[:-8], intact[:40] + b"\x93NUMPY"):  # a power loss, a cut, a torn header
        rows.write_bytes(damaged)
        assert cache.lookup(hashes) == {}
    np.save(rows, np.zeros((2, 8), np.float32))  # another backbone's length
    assert cache.lookup(hashes) == {}
    np.save(rows, np.zeros((2, 4), np.float64))
    assert cache.lookup(hashes) == {}
    np.save(rows, np.zeros((3, 4), np.float32))  # rows that do not match the keys
    assert cache.lookup(hashes) == {}
    keys.unlink()
    rows.unlink()
    cache.add(hashes[:1], np.ones((1, 4), np.float32))  # recomputed and stored again
    assert list(cache.lookup(hashes)) == hashes[:1]


def test_a_shard_is_visible_only_once_its_keys_are_written(tmp_path):
    cache = FeatureCache(tmp_path, "backbone", feature_dim=4)
    cache.root.mkdir(parents=True)
    np.save(cache.root / "orphan.npy", np.ones((1, 4), np.float32))  # a crash between the two renames
    assert cache.lookup(["ab" * 32]) == {}


def test_features_of_the_one_file_per_image_layout_are_still_read(tmp_path):
    cache = FeatureCache(tmp_path, "backbone", feature_dim=4)
    sha256 = "ab" * 32
    (cache.root / "ab").mkdir(parents=True)
    np.save(cache.root / "ab" / f"{sha256}.npy", np.full(4, 2, np.float32))
    np.save(cache.root / "ab" / f"{'ac' * 32}.npy", np.zeros(3, np.float32))  # damaged: recomputed
    assert list(cache.lookup([sha256, "ac" * 32])) == [sha256]


def test_features_go_to_the_cache_a_shard_at_a_time_and_a_cancel_keeps_them(small_digits_dir, tmp_path, monkeypatch):
    import training.features as features
    from training.errors import Cancelled

    items = [types.SimpleNamespace(path=path, sha256=f"{index:064x}")
             for index, path in enumerate(sorted(small_digits_dir.glob("*/*.png"))[:10])]
    backbone = types.SimpleNamespace(features=lambda pixels: pixels.reshape(len(pixels), -1)[:, :4] + 1000)
    cache = FeatureCache(tmp_path, "backbone", feature_dim=4)
    monkeypatch.setattr(features, "SHARD_ROWS", 4)
    batches = []

    def cancel_after_three_batches():
        return sum(report.current > 0 for report in batches) >= 3  # three batches of two done

    with pytest.raises(Cancelled):
        features.extract_features(items, cache, lambda: backbone, 32, batch_size=2, progress=batches.append,
                                  cancel=cancel_after_three_batches)
    assert len(list(cache.root.glob("*.keys"))) == 2  # a full shard of 4, then the 2 computed before the cancel
    vectors, computed = features.extract_features(items, cache, lambda: backbone, 32, batch_size=2)
    assert computed == 4 and vectors.shape == (10, 4)
    assert len(cache.lookup(item.sha256 for item in items)) == 10


def test_training_recomputes_a_damaged_shard(small_digits_dir, settings):
    from training.options import parse_options
    from training.pipeline import train

    params = parse_options({"image_size": 32, "epochs": 2})
    first = train(small_digits_dir, "torn", settings, params)
    (shard,) = sorted(settings.feature_cache_dir.rglob("*.npy"))
    assert first.features_computed == 36
    shard.write_bytes(shard.read_bytes()[:200])
    again = train(small_digits_dir, "torn", settings, params)
    assert again.features_computed == 36
    assert again.metrics["confusion_matrix"] == first.metrics["confusion_matrix"]
    assert train(small_digits_dir, "torn", settings, params).features_computed == 0


def test_a_weights_file_replaced_at_the_same_path_gives_a_new_shared_backbone(tmp_path):
    clear_shared_backbones()
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.weights.h5"
    source = build_backbone(BackboneSpec("none", "avg", 32))
    source.model.save_weights(path)
    spec = BackboneSpec(str(path), "avg", 32)
    first = shared_backbone(spec)
    assert shared_backbone(spec) is first
    scaled = [w * 0.5 for w in source.model.get_weights()]
    source.model.set_weights(scaled)
    source.model.save_weights(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new file, even on coarse clocks
    second = shared_backbone(spec)
    assert second is not first and second.id != first.id
    pixels = np.ones((1, 32, 32, 3), np.float32)
    np.testing.assert_allclose(second.features(pixels), source.features(pixels), rtol=1e-6)
    clear_shared_backbones()
