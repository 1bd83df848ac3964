"""The frozen VGG19 backbone: building it, loading its weights, naming it.

A backbone is identified by a string (`Backbone.id`) that changes whenever its
features would: weights (by content), feature layer, image size, preprocessing and
the precision it computes in. The feature cache and saved models record that id, so
features from one backbone are never mixed with another's, and a head is served on
features of the precision it was trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from training.errors import WeightsError
from training.images import PREPROCESSING_VERSION, check_image_size
from training.settings import PRECISIONS

FEATURE_LAYERS = ("avg", "fc2")
WEIGHTS_FILES = {
    # include_top -> the file Keras downloads into KERAS_HOME/models.
    False: "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    True: "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
}
RANDOM_SEED = 0
# Backbones a training process keeps built (training needs one; evaluating an older version may need another).
SHARED_BACKBONES = 2
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: weights source, feature layer and input size."""

    weights: str = "imagenet"
    feature_layer: str = "avg"
    image_size: int = 224

    def __post_init__(self) -> None:
        if self.feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS}, received: {self.feature_layer!r}")
        check_image_size(self.image_size)
        if self.feature_layer == "fc2" and self.image_size != 224:
            raise ValueError(f"feature_layer 'fc2' needs image_size 224, received: {self.image_size}")

    @property
    def include_top(self) -> bool:
        """Whether the fully connected top layers are part of the backbone."""
        return self.feature_layer == "fc2"

    @property
    def feature_dim(self) -> int:
        """Length of one image's feature vector."""
        return 4096 if self.feature_layer == "fc2" else 512

    @property
    def parameters(self) -> int:
        """Weights in the backbone (the convolutional part, plus fc1 and fc2 for `fc2`), whatever the image size."""
        return 139_570_240 if self.feature_layer == "fc2" else 20_024_384


@dataclasses.dataclass
class Backbone:
    """A built feature extractor: a Keras model from preprocessed images to features."""

    spec: BackboneSpec
    model: object  # keras.Model
    weights_id: str
    precision: str = "float32"

    @property
    def id(self) -> str:
        """A string naming everything that determines this backbone's features."""
        return backbone_id(self.spec, self.weights_id, self.precision)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Compute features for a batch of preprocessed images (float32 arrays, whatever the precision)."""
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


def backbone_id(spec: BackboneSpec, weights_id: str, precision: str = "float32") -> str:
    """Name a backbone by weights, layer, size, preprocessing version and precision."""
    check_precision(precision)
    return f"vgg19-{weights_id}-{spec.feature_layer}-{spec.image_size}px-p{PREPROCESSING_VERSION}-{precision}"


def check_precision(precision: str) -> str:
    """Return `precision` if it is one of PRECISIONS, else raise ValueError naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, received: {precision!r}")
    return precision


def weights_id(weights: str) -> str:
    """Identify a weights source without loading it (a file is named by its content hash)."""
    if weights in ("imagenet", "none"):
        return "imagenet" if weights == "imagenet" else f"random{RANDOM_SEED}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"BACKBONE_WEIGHTS file not found: {path}")
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hash a weights file once per (path, size, mtime): serving asks for the id on every request."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file{digest.hexdigest()[:12]}"


def _seeded_random_init(model) -> None:
    """Give a weights=None model the same He-uniform weights in every process.

    Keras' own random init differs per process; the service and the trainer must
    compute identical features, so the random weights come from a fixed seed.
    """
    rng = np.random.default_rng(RANDOM_SEED)
    values = []
    for weight in model.weights:
        shape = tuple(weight.shape)
        if len(shape) == 1:
            values.append(np.zeros(shape, np.float32))
            continue
        fan_in = int(np.prod(shape[:-1]))
        limit = np.sqrt(6.0 / fan_in)
        values.append(rng.uniform(-limit, limit, shape).astype(np.float32))
    model.set_weights(values)


def _imagenet_weights_path(include_top: bool, keras_home: Path) -> str:
    """Download (or find in the Keras cache) the ImageNet weights file."""
    from keras.utils import get_file

    fname = WEIGHTS_FILES[include_top]
    origin = f"https://storage.googleapis.com/tensorflow/keras-applications/vgg19/{fname}"
    try:
        return get_file(fname, origin, cache_subdir="models", cache_dir=str(keras_home))
    except Exception as exc:
        raise WeightsError(
            f"Could not download the VGG19 ImageNet weights ({exc.__class__.__name__}). "
            f"Place {fname} at {keras_home / 'models' / fname}, or set BACKBONE_WEIGHTS=/path/to/{fname} "
            f"(BACKBONE_WEIGHTS=none uses random weights, for tests)."
        ) from None


def accelerator_present(backend: str) -> bool:
    """Whether Keras' `backend` sees a GPU (or TPU) on this machine.

    Asked of the framework that will run the model: the GPU hosts have PyTorch
    and JAX but no TensorFlow. A framework that is not installed sees none.
    """
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "jax":
            import jax

            return any(device.platform in ("gpu", "tpu") for device in jax.devices())
    except (ImportError, RuntimeError) as exc:  # jax raises RuntimeError when no backend initialises
        logger.debug("cannot ask %s for an accelerator: %s", backend, exc)
    return False


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bfloat16_supported(backend: str | None = None) -> bool:
    """Whether this machine runs bfloat16 convolutions natively (a GPU, or a CPU with AVX512-BF16/AMX)."""
    if backend is None:
        import keras

        backend = keras.backend.backend()
    return _bfloat16_supported(backend)


@functools.cache
def _bfloat16_supported(backend: str) -> bool:
    """Asked once per process and backend: the hardware does not change, and serving asks per request."""
    supported = accelerator_present(backend) or cpu_has_bfloat16()
    if not supported:
        logger.warning("this hardware has no native bfloat16: bfloat16 requests run in float32")
    return supported


def effective_precision(requested: str) -> str:
    """The precision to compute in: `requested`, or float32 where this hardware has no native bfloat16.

    Emulated bfloat16 is many times slower than float32 and no more accurate, so a
    bfloat16 request on such hardware runs float32 (and the log says so once).
    """
    check_precision(requested)
    return "float32" if requested == "bfloat16" and not bfloat16_supported() else requested


# Held while Keras layers are created: the dtype policy and the random-number state are process-wide.
LAYER_BUILD_LOCK = threading.Lock()


def _vgg19(spec: BackboneSpec, precision: str):
    """Construct VGG19 with random weights; bfloat16 computes in bfloat16 and keeps float32 weights."""
    import keras

    with LAYER_BUILD_LOCK:  # the dtype policy is global while layers are created
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        try:
            return keras.applications.VGG19(
                include_top=spec.include_top,
                weights=None,
                input_shape=(spec.image_size, spec.image_size, 3),
                pooling=None if spec.include_top else "avg",
            )
        finally:
            keras.config.set_dtype_policy(previous)


def build_backbone(spec: BackboneSpec = BackboneSpec(), keras_home: Path | None = None, precision: str = "float32"):
    """Build the frozen VGG19 feature extractor for `spec`, computing in `precision`."""
    import keras

    check_precision(precision)
    keras_home = keras_home or Path("~/.keras").expanduser()
    wid = weights_id(spec.weights)
    model = _vgg19(spec, precision)
    if spec.weights == "none":
        _seeded_random_init(model)
    else:
        path = _imagenet_weights_path(spec.include_top, keras_home) if spec.weights == "imagenet" else spec.weights
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsError(
                f"Cannot load VGG19 weights from {path} ({exc}); it must be "
                f"{WEIGHTS_FILES[spec.include_top]} for feature_layer {spec.feature_layer!r}."
            ) from None
    if spec.include_top:
        model = keras.Model(model.input, model.get_layer("fc2").output, name="vgg19_fc2")
    model.trainable = False
    return Backbone(spec=spec, model=model, weights_id=wid, precision=precision)


_SHARED: collections.OrderedDict[str, Backbone] = collections.OrderedDict()
_SHARED_LOCK = threading.Lock()


def shared_backbone(spec: BackboneSpec, keras_home: Path | None = None, precision: str = "float32") -> Backbone:
    """Build a backbone once per process and reuse it (it is frozen, so sharing is safe).

    Keyed by the backbone id, which names the weights by content: a weights file
    replaced at the same path gives a new backbone, never the stale one.
    """
    key = backbone_id(spec, weights_id(spec.weights), precision)
    with _SHARED_LOCK:  # one build at a time: two threads asking at once get the same backbone
        if key not in _SHARED:
            _SHARED[key] = build_backbone(spec, keras_home, precision)
            while len(_SHARED) > SHARED_BACKBONES:
                _SHARED.popitem(last=False)
        _SHARED.move_to_end(key)
        return _SHARED[key]


def clear_shared_backbones() -> None:
    """Forget the backbones `shared_backbone` built (benchmarks that time a fresh process's first run)."""
    with _SHARED_LOCK:
        _SHARED.clear()
