"""One training run: (ingest) → features (cached) → head → optional fine-tune → evaluate → save.

This is what the CLI and the Celery task call: the CLI with a folder or an archive, which is
ingested here; a job with the stored dataset read from its manifest (`training.data.store`),
whose images are not decoded or hashed again (features are cached by content hash, so only
images new to the cache are decoded, for the backbone). It reports progress through a
callback and stops within one epoch or feature batch when its cancel check says so;
a cancelled or failed run writes no version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from training.backbone import BackboneSpec, backbone_id, effective_precision, shared_backbone, weights_id
from training.data.dataset import Dataset, IngestLimits
from training.data.ingest import ingest, work_folder
from training.decoded import DecodedImages
from training.errors import InvalidInput
from training.evaluate import evaluate, summary_scores
from training.features import FeatureCache, extract_features
from training.finetune import FineTuneParams, fine_tune
from training.head import HEADS, HeadParams, prepare_head, train_head
from training.images import PREPROCESSING
from training.predict import LoadedModel, file_probabilities
from training.progress import CancelFn, Progress, ProgressFn, never_cancel, no_progress, raise_if_cancelled
from training.settings import Settings
from training.store import PUBLISH_POLICIES, ModelStore, validate_name

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Everything that shapes one training run besides the data."""

    image_size: int = 224
    feature_layer: str = "avg"
    head: HeadParams = HeadParams()
    fine_tune: FineTuneParams | None = None
    val_split: float = 0.2
    seed: int = 0
    publish: str = "auto"
    feature_batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.05 <= self.val_split <= 0.5:
            raise InvalidInput(f"val_split must be from 0.05 to 0.5, received: {self.val_split!r}")
        if self.publish not in PUBLISH_POLICIES:
            raise InvalidInput(f"publish must be one of {PUBLISH_POLICIES}, received: {self.publish!r}")
        if not 1 <= self.feature_batch_size <= 1024:
            raise InvalidInput(f"feature_batch_size must be 1 to 1024, received: {self.feature_batch_size!r}")


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    name: str
    version: int
    published: bool
    metrics: dict
    dataset: dict
    timings: dict[str, float]
    history: dict
    features_computed: int


def split_indices(dataset: Dataset, labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices: the dataset's own split folders, else a stratified split."""
    if dataset.has_split():
        splits = np.array([item.split for item in dataset.items])
        train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
        if len(val):
            return train, val
        labels = labels[train]
        indices = train
    else:
        indices = np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(labels))
    # At least one validation image per class, so every class is scored.
    n_val = max(n_classes, int(round(val_split * len(indices))))
    train, val = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's numbers."""
    import cv2
    import keras
    import PIL
    import sklearn

    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "keras_backend": keras.backend.backend(), "numpy": np.__version__,
                "pillow": PIL.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__}
    if versions["keras_backend"] == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def _params_dict(params: TrainParams) -> dict:
    data = dataclasses.asdict(params)
    data["head"]["learning_rate"] = params.head.effective_learning_rate
    return data


def train(source: str | Path | Dataset, name: str, settings: Settings, params: TrainParams = TrainParams(),
          progress: ProgressFn = no_progress, cancel: CancelFn = never_cancel,
          job_id: str | None = None) -> TrainResult:
    """Train a model named `name` on a dataset and save it as a new version.

    `source` is a folder or an archive, ingested first (phase `ingest`), or a `Dataset`
    already ingested (a stored dataset's manifest), used as it is. `job_id` is recorded in
    the version's metadata, so a job that is run again after a crash can find the version it
    already produced instead of making a second one.
    """
    validate_name(name)
    spec = BackboneSpec(settings.backbone_weights, params.feature_layer, params.image_size)
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] = round(now - clock, 3)
        clock = now

    with work_folder(settings.data_dir, "train-") as workdir:
        if isinstance(source, Dataset):
            dataset = source
        else:
            progress(Progress("ingest", 0, 1))
            dataset = ingest(source, Path(workdir) / "dataset", IngestLimits.from_settings(settings))
            progress(Progress("ingest", 1, 1))
            lap("ingest")
        raise_if_cancelled(cancel)

        classes = dataset.classes
        labels = np.array([classes.index(item.label) for item in dataset.items])
        train_idx, val_idx = split_indices(dataset, labels, params.val_split, params.seed)
        weights = weights_id(spec.weights)
        # Features for training and validation, and so the recorded metrics, come from this precision;
        # the service serves the version in it (see `training.predict.serving_precision`).
        precision = effective_precision(settings.precision)
        cache = FeatureCache.from_settings(settings, backbone_id(spec, weights, precision), spec.feature_dim)

        def get_backbone():
            return shared_backbone(spec, settings.keras_home, precision)

        paths = [item.path for item in dataset.items]
        # Fine-tuning reads the images every epoch and validates on them after: decode each once for the run.
        load = DecodedImages(paths, spec.image_size, workdir, settings.max_image_pixels).batch \
            if params.fine_tune else None
        # The head's train step is traced beside the backbone (off the critical path of a first run).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-head") as side:
            prepared = side.submit(prepare_head, spec.feature_dim, len(classes), params.head, len(train_idx))
            # matplotlib's import (0.4 s, paid by every queued job's fresh process) too; the save imports it.
            side.submit(importlib.import_module, "training.plots")
            features, computed = extract_features(dataset.items, cache, get_backbone, spec.image_size,
                                                  params.feature_batch_size, progress, cancel, load)
            if prepared.exception() is not None:  # only time is lost: train_head builds its own
                log.warning("could not prepare the head beside the features: %s", prepared.exception())
        lap("features")

        head, history = train_head(features[train_idx], labels[train_idx], features[val_idx], labels[val_idx],
                                   len(classes), params.head, progress, cancel)
        lap("head")

        model, kind, fine_tune_history, unfrozen, fine_tune_report = head, "head", {}, [], None
        # Validation is scored by the method that serves the version, so its recorded metrics are what it answers.
        probabilities = LoadedModel.unsaved(name, "head", classes, spec.image_size, head).probabilities(
            features=features[val_idx])
        if params.fine_tune:
            tuned, fine_tune_history, unfrozen = fine_tune(
                get_backbone().model, head, spec.image_size, len(classes),
                ([paths[i] for i in train_idx], labels[train_idx]), ([paths[i] for i in val_idx], labels[val_idx]),
                params.fine_tune, progress, cancel, workdir, load)
            lap("fine-tune")
            tuned_probabilities = file_probabilities(LoadedModel.unsaved(name, "full", classes, spec.image_size, tuned),
                                                     [paths[i] for i in val_idx], load=load)
            head_accuracy = summary_scores(probabilities, labels[val_idx])["accuracy"]
            tuned_accuracy = summary_scores(tuned_probabilities, labels[val_idx])["accuracy"]
            # Fine-tuning can overfit a small dataset; keep whichever validates better
            # (the head on a tie: it shares the backbone and is cheaper to serve).
            kept = params.fine_tune.keep == "always" or tuned_accuracy > head_accuracy
            fine_tune_report = {"kept": kept, "head_accuracy": head_accuracy, "fine_tuned_accuracy": tuned_accuracy}
            if kept:
                model, kind, probabilities = tuned, "full", tuned_probabilities

        progress(Progress("evaluate", 0, 1))
        metrics = evaluate(probabilities, labels[val_idx], classes)
        progress(Progress("evaluate", 1, 1))
        lap("evaluate")
        raise_if_cancelled(cancel)

    progress(Progress("save", 0, 1))
    report = dataset.report()
    report.update({"train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
                   "split": "folders" if dataset.has_split() else f"stratified {params.val_split:.0%}"})
    metadata = {
        "name": name,
        "job": job_id,
        "kind": kind,
        "classes": classes,
        "metrics": metrics,
        "params": _params_dict(params),
        "dataset": {key: report[key] for key in ("id", "classes", "images", "train_images", "val_images", "split")}
        | {"skipped": len(report["skipped"]), "duplicates": len(report["duplicates"]),
           "conflicts": len(report["conflicts"])},
        "backbone": {"id": backbone_id(spec, weights, precision), "architecture": "VGG19",
                     "weights": weights, "precision": precision, "feature_layer": spec.feature_layer,
                     "feature_dim": spec.feature_dim, "image_size": spec.image_size,
                     "fine_tuned_layers": unfrozen if kind == "full" else []},
        "fine_tune": fine_tune_report,
        "preprocessing": PREPROCESSING,
        "history": {"head": history, "fine_tune": fine_tune_history},
        "features_computed": computed,
        "library_versions": library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training_seconds": round(time.perf_counter() - started, 3),
        "timings": timings,
    }
    try:
        version, published = ModelStore.from_settings(settings).save_version(
            name, lambda folder: _write_model_files(folder, model, kind, history, fine_tune_history, metrics, classes),
            metadata, classes, params.publish)
    finally:
        HEADS.give_back(head)  # saved (or failed): the next run of this head shape reuses its traced train step
    lap("save")
    progress(Progress("save", 1, 1))
    return TrainResult(name=name, version=version, published=published, metrics=metrics, dataset=report,
                       timings=timings, history=metadata["history"], features_computed=computed)


def _write_model_files(folder: Path, model, kind: str, history: dict, fine_tune_history: dict,
                       metrics: dict, classes: list[str]) -> None:
    """Write the Keras file and the plots of a new version into its staging folder."""
    from training.plots import plot_confusion_matrix, plot_history
    from training.store import MODEL_FILES

    model.save(folder / MODEL_FILES[kind])
    plots = folder / "plots"
    plots.mkdir()
    plot_history(history, plots / "training.png", "Head training")
    if fine_tune_history:
        plot_history(fine_tune_history, plots / "fine_tune.png", "Fine-tuning")
    plot_confusion_matrix(metrics["confusion_matrix"], classes, plots / "confusion_matrix.png")
