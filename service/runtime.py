"""The prediction runtime: one shared backbone per process, many small heads.

Head-only models share the backbone their features came from (one per feature
layer and image size), so an extra model costs only its head's few hundred KB,
and one image scored by several models costs one backbone pass. Fine-tuned
models carry their own backbone and run whole. Each request resolves the
published version once, so a publish or roll back takes effect on the next
request without a restart, and no request mixes two versions.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service import metrics
from service.batching import MicroBatcher
from training.backbone import bfloat16_supported, weights_id
from training.errors import ImageError, TrainingError
from training.head import head_probabilities
from training.images import preprocess_image
from training.predict import LoadedModel, backbone_for, load_version, top_k_labels
from training.settings import Settings
from training.store import ModelStore

MAX_CACHED_MODELS = 256
logger = logging.getLogger(__name__)


class ModelRuntime:
    """Load stored models on demand and answer predictions through micro-batched forwards."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_dir)
        self.precision = settings.precision
        if self.precision == "bfloat16" and not bfloat16_supported():
            logger.warning("PRECISION=bfloat16, but this hardware has no native bfloat16: running float32")
            self.precision = "float32"
        self._models: collections.OrderedDict[tuple[str, int], LoadedModel] = collections.OrderedDict()
        self._batchers: dict[tuple, MicroBatcher] = {}
        self._lock = threading.Lock()
        self._decoders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")

    # --- models -------------------------------------------------------------------------------------------------

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        """The requested version (default: the published one), loaded once and cached."""
        version = self.store.resolve_version(name, version)
        key = (name, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        loaded = load_version(self.store, name, version)  # outside the lock: loads take tens of ms
        metrics.MODEL_LOADS.labels(name).inc()
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > MAX_CACHED_MODELS:
                self._models.popitem(last=False)
        return loaded

    def _batcher(self, key: tuple, forward, name: str) -> MicroBatcher:
        with self._lock:
            if key not in self._batchers:
                s = self.settings
                self._batchers[key] = MicroBatcher(forward, s.max_batch_size, s.max_batch_wait_ms,
                                                   s.max_queue_images, name=name, on_batch=_record_batch)
            return self._batchers[key]

    def _features(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        """Backbone features for a head-only model, through the shared backbone's batcher."""
        backbone = backbone_for(model, self.settings, self.precision)
        return self._batcher(("backbone", backbone.id, self.precision), backbone.features,
                             f"backbone-{backbone.spec.image_size}").submit(pixels)

    def _probabilities(self, model: LoadedModel, pixels: np.ndarray, features: np.ndarray | None = None):
        if model.kind == "full":
            forward = model.keras_model.predict_on_batch
            return np.asarray(self._batcher(("full", model.name, model.version), forward,
                                            f"model-{model.name}-{model.version}").submit(pixels), np.float64)
        if features is None:
            features = self._features(model, pixels)
        return np.asarray(head_probabilities(model.keras_model, features), np.float64)

    # --- requests -----------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[bytes], image_size: int) -> np.ndarray:
        """Decode and preprocess a request's images; an error names the image's position."""
        def one(item: tuple[int, bytes]) -> np.ndarray:
            index, data = item
            try:
                return preprocess_image(data, image_size, self.settings.max_image_pixels)
            except ImageError as exc:
                raise type(exc)(f"image {index}: {exc.message}") from None

        if not images:
            raise TrainingError("no images given")
        work = list(enumerate(images))
        arrays = [one(work[0])] if len(work) == 1 else list(self._decoders.map(one, work))
        return np.stack(arrays)

    def predict(self, name: str, images: list[bytes], version: int | None = None, top_k: int = 3) -> dict:
        """Score images with one model version; answers are in input order."""
        model = self.model(name, version)
        probabilities = self._probabilities(model, self.preprocess(images, model.image_size))
        return {"model": name, "version": model.version,
                "predictions": top_k_labels(probabilities, model.classes, top_k)}

    def predict_many(self, names: list[str], images: list[bytes], top_k: int = 3) -> dict:
        """Score the same images with several published models, one backbone pass per backbone."""
        models = [self.model(name) for name in names]
        pixels: dict[int, np.ndarray] = {}
        features: dict[str, np.ndarray] = {}
        results = []
        for model in models:
            size = model.image_size
            if size not in pixels:
                pixels[size] = self.preprocess(images, size)
            shared = None
            if model.kind == "head":
                backbone_id = model.metadata["backbone"]["id"]
                if backbone_id not in features:
                    features[backbone_id] = self._features(model, pixels[size])
                shared = features[backbone_id]
            probabilities = self._probabilities(model, pixels[size], shared)
            results.append({"model": model.name, "version": model.version,
                            "predictions": top_k_labels(probabilities, model.classes, top_k)})
        return {"results": results}

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        """Each component's state: 'ok' or why it is not ready."""
        return {"backbone": backbone_weights_problem(self.settings) or "ok"}

    def close(self) -> None:
        """Stop the batching threads."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()
        self._decoders.shutdown(wait=False)


def backbone_weights_problem(settings: Settings) -> str | None:
    """Why the backbone weights cannot be loaded now, or None."""
    if settings.backbone_weights == "imagenet":
        return None  # Keras downloads them on first use; a failure then names the file to place.
    try:
        weights_id(settings.backbone_weights)
    except TrainingError as exc:
        return exc.message
    return None


def _record_batch(batch_rows: int, queued_rows: int) -> None:
    metrics.BATCH_SIZE.observe(batch_rows)
    metrics.QUEUE_DEPTH.set(queued_rows)
