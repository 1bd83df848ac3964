"""Memory under gunicorn: walking through more fine-tuned versions than MAX_MODEL_MEMORY_MB holds keeps the
worker's RSS under the bound plus one model, and every request is answered."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest

from tests.live import fetch, gunicorn, multipart
from training.options import parse_options
from training.pipeline import train
from training.settings import Settings

MIB = 2**20
VERSIONS = 6
# Holds two whole VGG19 models (80 MB of weights each), not three.
BOUND_MB = 200


@pytest.fixture(scope="module")
def fine_tuned_store(tmp_path_factory, small_digits_dir) -> Settings:
    """A store with VERSIONS fine-tuned versions: one trained, the others copies under their own numbers."""
    root = tmp_path_factory.mktemp("memory")
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=root / "keras")
    train(small_digits_dir, "tuned", settings, parse_options(
        {"image_size": 32, "epochs": 3, "fine_tune": True, "fine_tune_keep": "always", "fine_tune_epochs": 1}))
    for version in range(2, VERSIONS + 1):  # distinct files, so each is loaded on its own
        shutil.copytree(settings.model_dir / "tuned" / "1", settings.model_dir / "tuned" / str(version))
    return settings


def test_rss_stays_under_the_bound_plus_one_model(fine_tuned_store, small_digits_dir, tmp_path):
    model_bytes = (fine_tuned_store.model_dir / "tuned" / "1" / "model.keras").stat().st_size
    assert BOUND_MB * MIB < 3 * model_bytes  # the walk cannot keep every version in memory
    body, content_type = multipart("image", [sorted(small_digits_dir.glob("*/*.png"))[0].read_bytes()])
    with gunicorn(fine_tuned_store, tmp_path / "gunicorn.log", WEB_CONCURRENCY="1",
                  MAX_MODEL_MEMORY_MB=str(BOUND_MB)) as (base, process):
        [worker] = psutil.Process(process.pid).children()

        def predict(version: int) -> None:
            status, answer = fetch(f"{base}/v1/models/tuned/predict?version={version}", body,
                                   {"Content-Type": content_type})
            assert status == 200, answer
            assert json.loads(answer)["version"] == version

        predict(1)
        baseline = worker.memory_info().rss  # TensorFlow started, one model loaded and run
        peak = baseline
        for _ in range(2):
            for version in range(1, VERSIONS + 1):
                predict(version)
                peak = max(peak, worker.memory_info().rss)
        status, metrics = fetch(f"{base}/metrics")
    assert (peak - baseline) / MIB <= BOUND_MB + model_bytes / MIB, \
        f"RSS grew {(peak - baseline) / MIB:.0f} MiB over {VERSIONS} versions (bound {BOUND_MB} MiB)"
    held = [line for line in metrics.decode().splitlines() if line.startswith("classifier_model_memory_bytes")]
    assert held and float(held[0].split()[-1]) <= BOUND_MB * MIB, held
