"""The promise: what the service answers for a version is what its recorded metrics were computed from.

A head-only version, a fine-tuned one (`--fine-tune --fine-tune-keep always`) and a head trained with
PRECISION=bfloat16 are trained on real digits with `train/` and `val/` folders. Each is then reloaded
from disk and its `val/` images are scored by `python -m training evaluate` (a real process) and by
the service under gunicorn: both give back the recorded validation confusion matrix, image for image.
And fine-tuning must not wreck the head it starts from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.live import ROOT, fetch, gunicorn, multipart
from training.backbone import effective_precision
from training.demo import write_digits_dataset
from training.options import parse_options
from training.pipeline import train
from training.settings import Settings
from training.store import ModelStore

MODEL = "promise"
PER_CLASS, VAL_PER_CLASS = 24, 6
FINE_TUNE = {"fine_tune": True, "fine_tune_keep": "always", "fine_tune_epochs": 3}
# Fine-tuning may cost a little on a small validation set, never the model.
FINE_TUNE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def split_digits(tmp_path_factory):
    """Ten digit classes at 32 px, as `train/<label>/` and `val/<label>/` folders."""
    root = tmp_path_factory.mktemp("promise")
    write_digits_dataset(root / "all", image_size=32, per_class=PER_CLASS)
    for label_dir in sorted((root / "all").iterdir()):
        images = sorted(label_dir.glob("*.png"))
        for split, chosen in (("val", images[:VAL_PER_CLASS]), ("train", images[VAL_PER_CLASS:])):
            (root / "split" / split / label_dir.name).mkdir(parents=True)
            for image in chosen:
                shutil.copy(image, root / "split" / split / label_dir.name / image.name)
    return root / "split"


@pytest.fixture(scope="module")
def versions(tmp_path_factory, split_digits):
    """Settings over a store with v1 (head), v2 (fine-tuned) and v3 (head, PRECISION=bfloat16)."""
    root = tmp_path_factory.mktemp("promise-store")
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=root / "keras")
    options = {"image_size": 32, "epochs": 30, "publish": "never"}
    head = train(split_digits, MODEL, settings, parse_options(options))
    tuned = train(split_digits, MODEL, settings, parse_options(options | FINE_TUNE))
    bf16 = train(split_digits, MODEL, dataclasses.replace(settings, precision="bfloat16"), parse_options(options))
    return settings, {"head": head.version, "fine-tuned": tuned.version, "bfloat16": bf16.version}


def recorded(settings: Settings, version: int) -> dict:
    return ModelStore(settings.model_dir).metadata(MODEL, version)


def confusion_from_service(base: str, val_dir, classes: list[str], version: int) -> list[list[int]]:
    """The confusion matrix of the service's answers for every `val/` image, 16 images per request."""
    matrix = np.zeros((len(classes), len(classes)), int)
    images = sorted(val_dir.glob("*/*.png"))
    for start in range(0, len(images), 16):
        chunk = images[start:start + 16]
        body, content_type = multipart("image", [p.read_bytes() for p in chunk])
        status, answer = fetch(f"{base}/v1/models/{MODEL}/predict?version={version}", body,
                               {"Content-Type": content_type})
        assert status == 200, answer
        for path, prediction in zip(chunk, json.loads(answer)["predictions"]):
            matrix[classes.index(path.parent.name), classes.index(prediction["label"])] += 1
    return matrix.tolist()


def evaluate_cli(settings: Settings, val_dir, version: int) -> dict:
    """`python -m training evaluate --json` on the `val/` folder, as a user runs it."""
    command = [sys.executable, "-m", "training", "--model-dir", str(settings.model_dir),
               "--data-dir", str(settings.data_dir), "--weights", "none", "evaluate", str(val_dir),
               "--model", MODEL, "--version", str(version), "--json"]
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(settings.keras_home)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_version_records_what_it_was_trained_in(versions):
    settings, numbers = versions
    tuned = recorded(settings, numbers["fine-tuned"])
    assert tuned["kind"] == "full" and tuned["fine_tune"]["kept"] is True
    assert recorded(settings, numbers["head"])["kind"] == recorded(settings, numbers["bfloat16"])["kind"] == "head"
    for name, precision in (("head", "float32"), ("fine-tuned", "float32"), ("bfloat16", "bfloat16")):
        backbone = recorded(settings, numbers[name])["backbone"]
        # bfloat16 where this CPU computes it natively, else float32: either way what was used is recorded.
        assert backbone["precision"] == effective_precision(precision)
        assert backbone["id"].endswith(f"-{backbone['precision']}")


def test_fine_tuning_does_not_wreck_the_head(versions):
    settings, numbers = versions
    head = recorded(settings, numbers["head"])["metrics"]["accuracy"]
    tuned = recorded(settings, numbers["fine-tuned"])
    # The fine-tuned run starts from a head trained the same way (same data, seed and options).
    assert tuned["fine_tune"]["head_accuracy"] == pytest.approx(head)
    assert head >= 0.7, head  # random VGG19 features still separate digits
    assert tuned["metrics"]["accuracy"] >= head - FINE_TUNE_TOLERANCE, (tuned["metrics"]["accuracy"], head)


def test_evaluate_reproduces_the_recorded_validation_metrics(versions, split_digits):
    settings, numbers = versions
    # One `python -m training evaluate` per version, side by side (each process starts TensorFlow).
    with ThreadPoolExecutor(len(numbers)) as pool:
        scored = dict(zip(numbers, pool.map(lambda v: evaluate_cli(settings, split_digits / "val", v),
                                            numbers.values())))
    for name, version in numbers.items():
        expected = recorded(settings, version)["metrics"]
        assert scored[name]["samples"] == expected["samples"] == 10 * VAL_PER_CLASS, name
        assert scored[name]["confusion_matrix"] == expected["confusion_matrix"], name
        assert scored[name]["accuracy"] == expected["accuracy"], name


def test_the_service_answers_what_each_version_recorded(versions, split_digits, tmp_path):
    settings, numbers = versions
    with gunicorn(settings, tmp_path / "gunicorn.log", WEB_CONCURRENCY="1") as (base, _):
        for name, version in numbers.items():
            metadata = recorded(settings, version)
            served = confusion_from_service(base, split_digits / "val", metadata["classes"], version)
            assert served == metadata["metrics"]["confusion_matrix"], name
