"""The prediction runtime: one shared backbone per process, many small heads.

Head-only models share the backbone their features came from (one per feature
layer, image size and precision), so an extra model costs only its head's few
hundred KB, and one image scored by several models costs one backbone pass.
Fine-tuned models carry their own backbone and run whole, each behind its own
micro-batcher. Each request resolves the published version once, so a publish or
roll back takes effect on the next request without a restart, and no request
mixes two versions.

What the service answers for a version is what its recorded metrics were
computed from: the same preprocessing, the same weights (checked by backbone id)
and, unless SERVE_PRECISION says otherwise, the same precision.

Memory is bounded: backbones, fine-tuned models and heads live in one cache
bounded by weight bytes (MAX_MODEL_MEMORY_MB), and one forward pass holds at most
MAX_BATCH_PIXELS image pixels. The runtime imports no Flask: it reports batches
and loads through the hooks it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batching import BatcherClosed, MicroBatcher, padded, padded_sizes
from service.model_cache import ModelCache
from training.backbone import BackboneSpec, backbone_id, build_backbone, weights_id
from training.errors import ImageError, InvalidInput, ModelUnavailable, TrainingError
from training.head import warm_head
from training.images import preprocess_image, vgg19_preprocess
from training.predict import LoadedModel, backbone_spec, load_version, serving_precision, top_k_labels
from training.settings import Settings
from training.store import ModelStore

MIB = 2**20
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeHooks:
    """What the runtime reports as it works (the service turns these into metrics)."""

    on_batch: Callable[[int, int], None] = lambda batch_rows, queued_rows: None
    on_load: Callable[[str], None] = lambda name: None
    on_memory: Callable[[int, int], None] = lambda entries, nbytes: None


@dataclasses.dataclass
class Served:
    """A cached thing the runtime serves with: a model version or a backbone, and its batcher if it has one."""

    model: LoadedModel | None = None
    backbone: object | None = None  # training.backbone.Backbone
    batcher: MicroBatcher | None = None

    def close(self) -> None:
        """Stop the batching thread (after the work queued on it)."""
        if self.batcher is not None:
            self.batcher.close()


ITEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def weight_bytes(keras_model) -> int:
    """Bytes of a Keras model's weights: what a cached model costs, for the memory bound."""
    return sum(int(np.prod(w.shape)) * ITEM_BYTES.get(str(w.dtype), 4) for w in keras_model.weights)


class ModelRuntime:
    """Load stored models on demand and answer predictions through micro-batched forwards."""

    def __init__(self, settings: Settings, hooks: RuntimeHooks = RuntimeHooks()) -> None:
        self.settings, self.hooks = settings, hooks
        self.store = ModelStore.from_settings(settings)
        self._cache = ModelCache(settings.max_model_memory_mb * MIB, on_change=hooks.on_memory)
        self._decoders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")

    # --- models -------------------------------------------------------------------------------------------------

    def _identity(self, name: str, version: int) -> tuple:
        """What the version's files are now (the store says: local files' inode and mtime, shared ones' digest)."""
        return self.store.identity(name, version)

    def _served_model(self, name: str, version: int | None = None) -> Served:
        version = self.store.resolve_version(name, version)
        return self._cache.get(("model", name, version), self._identity(name, version),
                               lambda: self._load_model(name, version), self._file_bytes(name, version))

    def _file_bytes(self, name: str, version: int) -> int:
        """The size of a version's model file: about what its weights take in memory (stored uncompressed)."""
        try:
            return self.store.model_path(name, version)[1].stat().st_size
        except (TrainingError, OSError):
            return 0  # the load itself reports what is missing

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        """The requested version (default: the published one), loaded once and cached."""
        return self._served_model(name, version).model

    def _load_model(self, name: str, version: int) -> tuple[Served, int]:
        self._drop_stale_versions()
        loaded = load_version(self.store, name, version)
        self.hooks.on_load(name)
        batcher = None
        if loaded.kind == "head":
            warm_head(loaded.keras_model)  # in the load, which concurrent first requests wait for once
        if loaded.kind == "full":
            batcher = self._batcher(loaded.keras_model.predict_on_batch, f"model-{name}-{version}", loaded.image_size)
        return Served(model=loaded, batcher=batcher), weight_bytes(loaded.keras_model)

    def _drop_stale_versions(self) -> None:
        """Evict cached versions whose files were deleted or replaced since they were loaded."""
        def stale(key: tuple, identity: tuple) -> bool:
            if key[0] != "model":
                return False
            try:
                return self._identity(key[1], key[2]) != identity
            except (TrainingError, OSError):
                return True

        self._cache.discard_where(stale)

    def _served_backbone(self, model: LoadedModel) -> Served:
        """The shared backbone (and its batcher) a head-only version is served with."""
        spec = backbone_spec(model, self.settings)
        precision = serving_precision(model, self.settings)
        key = backbone_id(spec, weights_id(spec.weights), precision)
        return self._cache.get(("backbone", key), key, lambda: self._load_backbone(spec, precision),
                               spec.parameters * 4)

    def _load_backbone(self, spec: BackboneSpec, precision: str) -> tuple[Served, int]:
        backbone = build_backbone(spec, self.settings.keras_home, precision)
        batcher = self._batcher(backbone.features, f"backbone-{spec.image_size}px-{precision}", spec.image_size)
        return Served(backbone=backbone, batcher=batcher), weight_bytes(backbone.model)

    def rows_per_forward(self, image_size: int) -> int:
        """Images in one forward pass: MAX_BATCH_SIZE, fewer for large images (MAX_BATCH_PIXELS)."""
        return rows_per_forward(self.settings, image_size)

    def _batcher(self, forward, name: str, image_size: int) -> MicroBatcher:
        s, rows = self.settings, self.rows_per_forward(image_size)
        if pads_batches(s):
            forward = padded(forward, padded_sizes(rows))
        return MicroBatcher(forward, rows, s.max_batch_wait_ms, s.max_queue_images,
                            name=name, on_batch=self.hooks.on_batch, timeout_s=s.predict_timeout_s)

    # --- forward passes -----------------------------------------------------------------------------------------

    @staticmethod
    def _submit(get_served: Callable[[], Served], pixels: np.ndarray) -> np.ndarray:
        """Run pixels through a cached batcher; one evicted between lookup and submit is fetched again."""
        for _ in range(3):
            try:
                return get_served().batcher.submit(pixels)
            except BatcherClosed:
                continue
        raise ModelUnavailable("the model was unloaded three times while this request waited (memory pressure); "
                               "retry, or raise MAX_MODEL_MEMORY_MB")

    def _chunks(self, images: Sequence[bytes], image_size: int):
        """Decoded pixels of `images` in pieces of at most one forward pass, so a request is bounded in memory too."""
        step = self.rows_per_forward(image_size)
        for start in range(0, len(images), step):
            yield self.preprocess(images[start:start + step], image_size, first_index=start)

    def features(self, model: LoadedModel, images: Sequence[bytes]) -> np.ndarray:
        """Backbone features of `images` for a head-only version, through the shared backbone's batcher."""
        get_served = functools.partial(self._served_backbone, model)
        return np.concatenate([self._submit(get_served, pixels) for pixels in self._chunks(images, model.image_size)])

    def _pixel_chunks(self, rgb: np.ndarray, image_size: int):
        """Preprocessed pieces of RGB pixels `[N, size, size, 3]` (0..255), at most one forward pass each."""
        check_pixels(rgb, image_size)
        step = self.rows_per_forward(image_size)
        for start in range(0, len(rgb), step):
            yield vgg19_preprocess(np.array(rgb[start:start + step], np.float32))  # a copy: preprocessing is in place

    def probabilities(self, model: LoadedModel, images: Sequence[bytes], features: np.ndarray | None = None):
        """Class probabilities of `images` (or of their backbone `features`, for a head-only version)."""
        if features is not None:
            return model.probabilities(features=features)
        return self._forward_chunks(model, self._chunks(images, model.image_size))

    def pixel_probabilities(self, model: LoadedModel, rgb: np.ndarray) -> np.ndarray:
        """Class probabilities of images already decoded and resized: RGB `[N, size, size, 3]` in 0..255."""
        return self._forward_chunks(model, self._pixel_chunks(rgb, model.image_size))

    def _forward_chunks(self, model: LoadedModel, chunks) -> np.ndarray:
        """Score preprocessed pieces through `LoadedModel.probabilities` with the micro-batched forward.

        The method training scored the version's validation with, given the shared backbone's
        forward or the fine-tuned model's own.
        """
        if model.kind == "full":
            get_served = functools.partial(self._served_model, model.name, model.version)
        else:
            get_served = functools.partial(self._served_backbone, model)
        forward = functools.partial(self._submit, get_served)
        return np.concatenate([model.probabilities(pixels, forward=forward) for pixels in chunks])

    # --- requests -----------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[bytes], image_size: int, first_index: int = 0) -> np.ndarray:
        """Decode and preprocess images; an error names the image's position in the request."""
        def one(item: tuple[int, bytes]) -> np.ndarray:
            index, data = item
            try:
                return preprocess_image(data, image_size, self.settings.max_image_pixels)
            except ImageError as exc:
                raise type(exc)(f"image {index}: {exc.message}") from None

        if not images:
            raise InvalidInput("no images given")
        work = list(enumerate(images, start=first_index))
        arrays = [one(work[0])] if len(work) == 1 else list(self._decoders.map(one, work))
        return np.stack(arrays)

    def scores(self, name: str, images: list[bytes], version: int | None = None) -> tuple[LoadedModel, np.ndarray]:
        """The version scoring the images and their class probabilities, in input order."""
        model = self.model(name, version)
        return model, self.probabilities(model, images)

    def pixel_scores(self, name: str, rgb: np.ndarray, version: int | None = None) -> tuple[LoadedModel, np.ndarray]:
        """The version scoring decoded, resized RGB images `[N, size, size, 3]` and their class probabilities."""
        model = self.model(name, version)
        return model, self.pixel_probabilities(model, rgb)

    def predict(self, name: str, images: list[bytes], version: int | None = None, top_k: int = 3) -> dict:
        """Score images with one model version; answers are in input order."""
        model, probabilities = self.scores(name, images, version)
        return {"model": name, "version": model.version,
                "predictions": top_k_labels(probabilities, model.classes, top_k)}

    def predict_many(self, names: list[str], images: list[bytes], top_k: int = 3) -> dict:
        """Score the same images with several published models, one backbone pass per backbone."""
        models = [self.model(name) for name in names]
        features: dict[str, np.ndarray] = {}
        results = []
        for model in models:
            shared = None
            if model.kind == "head":
                key = self._served_backbone(model).backbone.id
                if key not in features:
                    features[key] = self.features(model, images)
                shared = features[key]
            probabilities = self.probabilities(model, images, shared)
            results.append({"model": model.name, "version": model.version,
                            "predictions": top_k_labels(probabilities, model.classes, top_k)})
        return {"results": results}

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        """Each component's state: 'ok' or why it is not ready."""
        problems = [problem for served in self._cache.values()
                    if served.batcher is not None and (problem := served.batcher.problem())]
        return {"backbone": backbone_weights_problem(self.settings) or "ok",
                "batching": "; ".join(problems) or "ok"}

    def close(self) -> None:
        """Stop the batching threads and unload every model."""
        self._cache.close()
        self._decoders.shutdown(wait=False)


def rows_per_forward(settings: Settings, image_size: int) -> int:
    """Images in one forward pass: MAX_BATCH_SIZE, fewer for large images (MAX_BATCH_PIXELS)."""
    return max(1, min(settings.max_batch_size, settings.max_batch_pixels // (image_size * image_size)))


def pads_batches(settings: Settings) -> bool:
    """Whether forward passes are padded to a few batch sizes: PAD_BATCHES, or under JAX when it is `auto`.

    JAX compiles the backbone once per batch shape; TensorFlow and PyTorch run any size as it comes,
    and padding there would only spend the CPU on zero rows.
    """
    if settings.pad_batches == "auto":
        import keras

        return keras.backend.backend() == "jax"
    return settings.pad_batches == "on"


def check_pixels(rgb: np.ndarray, image_size: int) -> None:
    """Refuse a pixel tensor that is not `[N, image_size, image_size, 3]` with N >= 1 and finite values."""
    expected = f"[N, {image_size}, {image_size}, 3]"
    if rgb.ndim != 4 or rgb.shape[1:] != (image_size, image_size, 3) or len(rgb) == 0:
        raise InvalidInput(f"pixels must have shape {expected} (RGB, 0 to 255, at the model's image size), "
                           f"received: {list(rgb.shape)}")
    if rgb.dtype.kind == "f" and not np.isfinite(rgb).all():
        raise InvalidInput("pixels must be finite numbers (RGB, 0 to 255); received NaN or infinity")


def backbone_weights_problem(settings: Settings) -> str | None:
    """Why the backbone weights cannot be loaded now, or None."""
    if settings.backbone_weights == "imagenet":
        return None  # Keras downloads them on first use; a failure then names the file to place.
    try:
        weights_id(settings.backbone_weights)
    except TrainingError as exc:
        return exc.message
    return None
