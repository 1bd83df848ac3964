"""Offline prediction with a stored model version, shared by the CLI and the service."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.backbone import BackboneSpec, backbone_id, effective_precision, shared_backbone, weights_id
from training.errors import TrainingError, WeightsError
from training.evaluate import evaluate
from training.features import FeatureCache, extract_features
from training.finetune import ImageBatches
from training.images import preprocess_image
from training.ingest import IngestLimits, ingest
from training.settings import Settings
from training.store import ModelStore


@dataclasses.dataclass
class LoadedModel:
    """One model version in memory: a head on the shared backbone, or a whole fine-tuned model."""

    name: str
    version: int
    kind: str  # "head" or "full"
    classes: list[str]
    metadata: dict
    keras_model: object

    @property
    def image_size(self) -> int:
        """Input size in pixels."""
        return int(self.metadata["backbone"]["image_size"])

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities from backbone features (head-only models)."""
        return np.asarray(self.keras_model.predict_on_batch(features), dtype=np.float64)

    def predict_pixels(self, pixels: np.ndarray, backbone=None) -> np.ndarray:
        """Class probabilities from preprocessed pixels."""
        if self.kind == "full":
            return np.asarray(self.keras_model.predict_on_batch(pixels), dtype=np.float64)
        return self.predict_features(backbone.features(pixels))


def load_version(store: ModelStore, name: str, version: int | None = None) -> LoadedModel:
    """Load a stored version (default: the published one)."""
    version = store.resolve_version(name, version)
    kind, _ = store.model_path(name, version)
    return LoadedModel(name=name, version=version, kind=kind, classes=store.labels(name, version),
                       metadata=store.metadata(name, version), keras_model=store.load_keras_model(name, version))


def trained_precision(metadata: dict) -> str:
    """The precision a version's features, and so its recorded metrics, were computed in."""
    return metadata["backbone"].get("precision", "float32")  # versions made before it was recorded: float32


def trained_backbone_id(metadata: dict) -> str:
    """The id of the backbone a version was trained on (versions made before ids named the precision: float32)."""
    stored = metadata["backbone"]
    return stored["id"] if "precision" in stored else f"{stored['id']}-float32"


def serving_precision(model: LoadedModel, settings: Settings) -> str:
    """The precision to serve a head-only version in: the one it was trained in, unless SERVE_PRECISION says otherwise.

    Either way only where the hardware computes it natively (else float32).
    """
    wanted = settings.serve_precision
    return effective_precision(trained_precision(model.metadata) if wanted == "trained" else wanted)


def backbone_spec(model: LoadedModel, settings: Settings) -> BackboneSpec:
    """The backbone a head-only version needs, checked against the weights it was trained on."""
    stored = model.metadata["backbone"]
    spec = BackboneSpec(settings.backbone_weights, stored["feature_layer"], stored["image_size"])
    current = backbone_id(spec, weights_id(spec.weights), trained_precision(model.metadata))
    if current != trained_backbone_id(model.metadata):
        raise WeightsError(
            f"model {model.name!r} v{model.version} was trained on backbone {stored['id']}, "
            f"but BACKBONE_WEIGHTS={settings.backbone_weights} gives {current}"
        )
    return spec


def backbone_for(model: LoadedModel, settings: Settings, precision: str | None = None):
    """The process's shared backbone for a head-only version, in `precision` (default: `serving_precision`)."""
    spec = backbone_spec(model, settings)
    return shared_backbone(spec, settings.keras_home, precision or serving_precision(model, settings))


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict]:
    """Turn rows of probabilities into `{"label", "probability", "top_k": [...]}` answers."""
    k = max(1, min(int(k), len(classes)))
    answers = []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[:k]
        top = [{"label": classes[i], "probability": float(row[i])} for i in order]
        answers.append({"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
    return answers


def predict_files(settings: Settings, name: str, paths: Sequence[str | Path], version: int | None = None,
                  top_k: int = 3, batch_size: int = 32) -> tuple[LoadedModel, list[dict]]:
    """Predict image files with a stored model; answers are in input order."""
    model = load_version(ModelStore(settings.model_dir), name, version)
    backbone = backbone_for(model, settings) if model.kind == "head" else None
    answers = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = np.stack([preprocess_image(Path(p).read_bytes(), model.image_size, settings.max_image_pixels)
                           for p in chunk])
        answers.extend(top_k_labels(model.predict_pixels(pixels, backbone), model.classes, top_k))
    return model, answers


def evaluate_dataset(settings: Settings, name: str, source: str | Path, version: int | None = None) -> dict:
    """Score a stored model on a labeled dataset (folder or archive); return the metrics."""
    model = load_version(ModelStore(settings.model_dir), name, version)
    limits = dataclasses.replace(IngestLimits.from_settings(settings), min_images_per_class=1)
    tmp_root = settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="evaluate-") as workdir:
        dataset = ingest(source, workdir, limits)
        unknown = sorted(set(dataset.classes) - set(model.classes))
        if unknown:
            raise TrainingError(f"classes not known to {name!r} v{model.version}: {', '.join(unknown)}")
        labels = np.array([model.classes.index(item.label) for item in dataset.items])
        if model.kind == "head":
            backbone = backbone_for(model, settings)
            cache = FeatureCache(settings.feature_cache_dir, backbone.id, backbone.spec.feature_dim)
            features, _ = extract_features(dataset.items, cache, lambda: backbone, model.image_size)
            probabilities = model.predict_features(features)
        else:
            batches = ImageBatches([item.path for item in dataset.items], labels, model.image_size, 32, shuffle=False)
            probabilities = model.keras_model.predict(batches, verbose=0)
    return evaluate(probabilities, labels, model.classes)
