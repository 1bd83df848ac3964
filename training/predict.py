"""The one inference path: a stored (or just trained) model version turns pixels into class probabilities.

Training's validation scoring, `python -m training predict|evaluate` and the service all call
`LoadedModel.probabilities`, so a version's recorded metrics come from the very code that serves it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from training.backbone import BackboneSpec, backbone_id, effective_precision, shared_backbone, weights_id
from training.data.dataset import IngestLimits
from training.data.ingest import ingest, work_folder
from training.errors import DatasetError, WeightsError
from training.evaluate import evaluate
from training.features import FeatureCache, Loader, extract_features, load_batch
from training.head import head_probabilities
from training.images import DEFAULT_MAX_PIXELS
from training.settings import Settings
from training.store import ModelStore

# Rows in, outputs out: a backbone's features (head-only versions) or a whole model's probabilities.
Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class LoadedModel:
    """One model version in memory: a head on the shared backbone, or a whole fine-tuned model."""

    name: str
    version: int
    kind: str  # "head" or "full"
    classes: list[str]
    metadata: dict
    keras_model: object

    @classmethod
    def unsaved(cls, name: str, kind: str, classes: list[str], image_size: int, keras_model) -> LoadedModel:
        """A model still in training's memory (version 0), scored through the same method as a stored one."""
        return cls(name=name, version=0, kind=kind, classes=classes,
                   metadata={"backbone": {"image_size": image_size}}, keras_model=keras_model)

    @property
    def image_size(self) -> int:
        """Input size in pixels."""
        return int(self.metadata["backbone"]["image_size"])

    def probabilities(self, pixels: np.ndarray | None = None, *, features: np.ndarray | None = None,
                      forward: Forward | None = None) -> np.ndarray:
        """Class probabilities of preprocessed `pixels` (or, for a head-only version, of their backbone `features`).

        `forward` runs the pixels through the backbone (head-only versions; required with pixels) or
        through the whole model (fine-tuned; default: one plain `predict_on_batch`). The service passes
        its micro-batched forward, everything else the plain one.
        """
        if self.kind == "full":
            if pixels is None:
                raise ValueError(f"pixels: a fine-tuned version scores images, received: {pixels!r}")
            return np.asarray((forward or self.keras_model.predict_on_batch)(pixels), np.float64)
        if features is None:
            if pixels is None or forward is None:
                raise ValueError("a head-only version needs features, or pixels and the backbone forward; "
                                 f"received: pixels {type(pixels).__name__}, forward {forward!r}")
            features = forward(pixels)
        return np.asarray(head_probabilities(self.keras_model, features), np.float64)


def file_probabilities(model: LoadedModel, paths: Sequence[str | Path], forward: Forward | None = None,
                       batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                       load: Loader | None = None) -> np.ndarray:
    """Class probabilities of image files, `batch_size` images decoded at a time so memory stays bounded.

    `load` gives a batch's pixels instead of decoding the files (a training run's `DecodedImages.batch`).
    """
    with ThreadPoolExecutor(max_workers=4) as pool:
        load = load or functools.partial(load_batch, image_size=model.image_size, pool=pool, max_pixels=max_pixels)
        parts = [model.probabilities(load(paths[start:start + batch_size]), forward=forward)
                 for start in range(0, len(paths), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(model.classes)))


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


def backbone_for(model: LoadedModel, settings: Settings):
    """The process's shared backbone for a head-only version, in its `serving_precision`."""
    return shared_backbone(backbone_spec(model, settings), settings.keras_home, serving_precision(model, settings))


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict]:
    """Turn rows of probabilities into `{"label", "probability", "top_k": [...]}` answers."""
    k = max(1, min(int(k), len(classes)))
    answers = []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[:k]
        top = [{"label": classes[i], "probability": float(row[i])} for i in order]
        answers.append({"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
    return answers


def load_with_forward(settings: Settings, name: str, version: int | None = None) -> tuple[LoadedModel, Forward | None]:
    """Load a stored version and the forward pass its pixels need (the shared backbone for a head-only one)."""
    model = load_version(ModelStore.from_settings(settings), name, version)
    return model, (backbone_for(model, settings).features if model.kind == "head" else None)


def predict_files(settings: Settings, name: str, paths: Sequence[str | Path], version: int | None = None,
                  top_k: int = 3, batch_size: int = 32) -> tuple[LoadedModel, list[dict]]:
    """Predict image files with a stored model; answers are in input order."""
    model, forward = load_with_forward(settings, name, version)
    probabilities = file_probabilities(model, paths, forward, batch_size, settings.max_image_pixels)
    return model, top_k_labels(probabilities, model.classes, top_k)


def evaluate_dataset(settings: Settings, name: str, source: str | Path, version: int | None = None) -> dict:
    """Score a stored model on a labeled dataset (folder or archive); return the metrics."""
    model = load_version(ModelStore.from_settings(settings), name, version)
    limits = dataclasses.replace(IngestLimits.from_settings(settings), min_images_per_class=1)
    with work_folder(settings.data_dir, "evaluate-") as workdir:
        dataset = ingest(source, workdir, limits)
        unknown = sorted(set(dataset.classes) - set(model.classes))
        if unknown:
            raise DatasetError(f"classes not known to {name!r} v{model.version}: {', '.join(unknown)}")
        labels = np.array([model.classes.index(item.label) for item in dataset.items])
        if model.kind == "head":
            # Through the feature cache: the features training computed for these images, if it did.
            backbone = backbone_for(model, settings)
            cache = FeatureCache.from_settings(settings, backbone.id, backbone.spec.feature_dim)
            features, _ = extract_features(dataset.items, cache, lambda: backbone, model.image_size)
            probabilities = model.probabilities(features=features)
        else:
            probabilities = file_probabilities(model, [item.path for item in dataset.items])
    return evaluate(probabilities, labels, model.classes)
