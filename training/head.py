"""The softmax head trained on cached backbone features.

Defaults follow the classic transfer-learning recipe: an optional hidden Dense
layer with He initialization, ELU, batch normalization and dropout; SGD with
Nesterov momentum (adaptive optimizers selectable); L2 regularization; early
stopping on validation loss restoring the best weights; balanced class weights.
The head standardizes its input itself, so it takes raw backbone features.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from training.backbone import LAYER_BUILD_LOCK
from training.errors import Cancelled, InvalidInput
from training.evaluate import summary_scores, top_k_for
from training.progress import CancelFn, Progress, ProgressFn, never_cancel, no_progress

OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam")
DEFAULT_LEARNING_RATES = {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01,
                          "rmsprop": 0.001, "adagrad": 0.01, "adam": 0.001}


@dataclasses.dataclass(frozen=True)
class HeadParams:
    """Hyper-parameters of the head and its training."""

    hidden_units: int = 256
    dropout: float = 0.3
    batch_norm: bool = True
    optimizer: str = "nesterov"
    learning_rate: float | None = None  # None: the optimizer's default above
    momentum: float = 0.9
    l2: float = 1e-4
    epochs: int = 50
    batch_size: int = 32
    patience: int = 8
    class_weights: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}, received: {self.optimizer!r}")
        checks = {
            "hidden_units": self.hidden_units >= 0,
            "dropout": 0 <= self.dropout < 1,
            "learning_rate": self.learning_rate is None or 0 < self.learning_rate <= 10,
            "momentum": 0 <= self.momentum < 1,
            "l2": self.l2 >= 0,
            "epochs": 1 <= self.epochs <= 10_000,
            "batch_size": 1 <= self.batch_size <= 65_536,
            "patience": self.patience >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInput(f"{name} is out of range, received: {getattr(self, name)!r}")

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate actually used."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.optimizer]


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9, clipnorm: float | None = None):
    """Build a Keras optimizer by its short name (optionally clipping each gradient's norm)."""
    clip = {"clipnorm": clipnorm} if clipnorm else {}
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, **clip)
    if name in ("momentum", "nesterov"):
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=name == "nesterov", **clip)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **clip)
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate, **clip)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **clip)
    raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}, received: {name!r}")


def build_head(feature_dim: int, n_classes: int, params: HeadParams, train_features: np.ndarray) -> keras.Model:
    """Build the head: standardize → [Dense(He, ELU) → BN → Dropout] → softmax."""
    regularizer = keras.regularizers.L2(params.l2) if params.l2 else None
    normalize = keras.layers.Normalization(name="standardize")
    normalize.adapt(train_features)
    inputs = keras.Input((feature_dim,), name="features")
    x = normalize(inputs)
    if params.hidden_units:
        x = keras.layers.Dense(params.hidden_units, kernel_initializer="he_normal",
                               kernel_regularizer=regularizer, name="hidden")(x)
        if params.batch_norm:
            x = keras.layers.BatchNormalization(name="hidden_bn")(x)
        x = keras.layers.Activation("elu", name="hidden_elu")(x)
        if params.dropout:
            x = keras.layers.Dropout(params.dropout, seed=params.seed, name="hidden_dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=regularizer,
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name="head")


def top_k_metric(n_classes: int):
    """A top-k accuracy metric with the k that evaluation reports."""
    return keras.metrics.SparseTopKCategoricalAccuracy(k=top_k_for(n_classes), name="top_k_accuracy")


class TrainingHooks(keras.callbacks.Callback):
    """Score validation features, report each epoch, and stop within one batch when cancelled.

    For head training, validation features are scored here with one direct model
    call per epoch: Keras' own per-epoch `evaluate` (a traced function and a fresh
    data iterator every epoch) costs more than a whole epoch of a small head.
    Placed before EarlyStopping, so the `val_*` values it adds are what it monitors.
    """

    def __init__(self, phase: str, epochs: int, progress: ProgressFn, cancel: CancelFn,
                 validation: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        self.phase, self.epochs, self.progress, self.cancel = phase, epochs, progress, cancel
        self.validation = validation
        self.cancelled = False

    def _check(self) -> None:
        if not self.cancelled and self.cancel():
            self.cancelled = True
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._check()

    def on_epoch_end(self, epoch, logs=None) -> None:
        logs = logs if logs is not None else {}
        if self.validation is not None:
            x_val, y_val = self.validation
            probabilities = keras.ops.convert_to_numpy(self.model(x_val, training=False))
            penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in self.model.losses)
            scores = summary_scores(probabilities, y_val)
            logs.update({"val_loss": scores["loss"] + penalty, "val_accuracy": scores["accuracy"],
                         "val_top_k_accuracy": scores["top_k_accuracy"]})
        metrics = {key: float(value) for key, value in logs.items()}
        self.progress(Progress(self.phase, epoch + 1, self.epochs, epoch + 1, metrics))
        self._check()


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Weights inversely proportional to class frequency (sklearn's 'balanced')."""
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    result = {index: 1.0 for index in range(n_classes)}
    result.update({int(c): float(w) for c, w in zip(present, weights)})
    return result


def fit_with_hooks(model: keras.Model, x, y, validation, epochs: int, batch_size: int | None,
                   class_weight, patience: int, phase: str, progress: ProgressFn, cancel: CancelFn,
                   validation_in_hooks: bool = False, steps_per_epoch: int | None = None) -> dict:
    """Fit with early stopping (best weights restored), progress and cancel; return the history."""
    hooks = TrainingHooks(phase, epochs, progress, cancel, validation if validation_in_hooks else None)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    history = model.fit(x, y, validation_data=None if validation_in_hooks else validation, epochs=epochs,
                        batch_size=batch_size, class_weight=class_weight, callbacks=[hooks, stop], verbose=0,
                        steps_per_epoch=steps_per_epoch, shuffle=steps_per_epoch is None)
    if hooks.cancelled:
        raise Cancelled("training was cancelled")
    return {key: [float(v) for v in values] for key, values in history.history.items()}


class HeadPool:
    """Compiled heads kept for the next run with the same shape, so a retrain skips Keras' tracing.

    The first `fit` of a new model traces its train step (twice: once to create variables), about
    0.9 s, several times the ten epochs themselves on a few hundred images. A worker that trains the
    same head shape again (a retrain, a hyper-parameter try) takes the traced model from here and
    resets it to the state a fresh build would have: initial weights, optimizer state, dropout seed.
    A model is lent to one run at a time; at most `max_idle` wait here, the least recently used go.
    """

    def __init__(self, max_idle: int = 4) -> None:
        self.max_idle = max_idle
        self._idle: collections.OrderedDict[tuple, list[keras.Model]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.reused = 0

    def take(self, key: tuple) -> keras.Model | None:
        """A model built for `key` and not lent to anyone, or None."""
        with self._lock:
            models = self._idle.get(key)
            if not models:
                return None
            model = models.pop()
            if not models:
                del self._idle[key]
            self.reused += 1
            return model

    def has(self, key: tuple) -> bool:
        """Whether a model for `key` is waiting here."""
        with self._lock:
            return bool(self._idle.get(key))

    def give_back(self, model: keras.Model) -> None:
        """Make a model that a run has finished with available to the next run of its shape."""
        key = getattr(model, "_pool_key", None)
        if key is None:
            return
        with self._lock:
            self._idle.setdefault(key, []).append(model)
            self._idle.move_to_end(key)
            while sum(len(models) for models in self._idle.values()) > self.max_idle:
                oldest = next(iter(self._idle))
                self._idle[oldest].pop(0)
                if not self._idle[oldest]:
                    del self._idle[oldest]

    def clear(self) -> None:
        """Forget every idle model."""
        with self._lock:
            self._idle.clear()


HEADS = HeadPool()


def _pool_key(feature_dim: int, n_classes: int, params: HeadParams) -> tuple:
    """What a compiled head's traced train step depends on (epochs and patience only bound the loop)."""
    return feature_dim, n_classes, dataclasses.replace(params, epochs=1, patience=1)


def _new_head(x_train: np.ndarray, n_classes: int, params: HeadParams) -> keras.Model:
    """Build and compile a head, and keep its initial state so it can be reused as if new."""
    model = build_head(x_train.shape[1], n_classes, params, x_train)
    model.compile(optimizer=make_optimizer(params.optimizer, params.effective_learning_rate, params.momentum),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    _standardize_from_variables(model)
    model._pool_key = _pool_key(x_train.shape[1], n_classes, params)
    model._initial_state = [keras.ops.convert_to_numpy(v) for v in _state_variables(model)]
    return model


def _state_variables(model: keras.Model) -> list:
    """Every variable a run changes: weights, batch-norm statistics, optimizer slots and step, dropout seeds."""
    seeds = [layer.seed_generator.state for layer in model.layers if getattr(layer, "seed_generator", None)]
    return list(model.variables) + list(model.optimizer.variables) + seeds


def _reset(model: keras.Model, x_train: np.ndarray) -> None:
    """Put a reused head back in the state `_new_head` left it in, standardized for these features."""
    for variable, value in zip(_state_variables(model), model._initial_state):
        variable.assign(value)
    model.get_layer("standardize").adapt(x_train)
    _standardize_from_variables(model)


def _standardize_from_variables(model: keras.Model) -> None:
    """Let the standardization read its statistics from its variables while the head trains.

    Keras' Normalization keeps what `adapt` computed as constant tensors, which a traced train
    step would capture: a reused head would train on the first run's statistics. Read from the
    variables, the traced step sees each run's own. (Set past Keras' attribute tracking: the
    variables are the layer's weights already.)
    """
    layer = model.get_layer("standardize")
    object.__setattr__(layer, "mean", layer.adapt_mean)
    object.__setattr__(layer, "variance", layer.adapt_variance)


def _standardize_from_constants(model: keras.Model) -> None:
    """Back to Keras' own constants, as a loaded version has them, and a predict function traced anew.

    So the validation probabilities training records come from the same graph the service runs.
    """
    model.get_layer("standardize").finalize_state()
    model.predict_function, model._traced_for_any_batch = None, False


def prepare_head(feature_dim: int, n_classes: int, params: HeadParams, train_rows: int,
                 pool: HeadPool | None = HEADS) -> None:
    """Build a head and trace its train step on stand-in features, and leave it in `pool` for `train_head`.

    Meant to run in a thread beside feature extraction: a fresh worker's first trace (about 0.9 s)
    then costs the run only the share of the cores it takes from the backbone. What `train_head` gets
    is reset to a fresh build's state, so the result is the same to the bit.
    """
    if pool is None or keras.backend.backend() != "tensorflow" or pool.has(_pool_key(feature_dim, n_classes, params)):
        return
    rows = min(train_rows, 2 * params.batch_size + 1)  # a partial batch, as the real data has, so no retrace
    x, y = np.zeros((rows, feature_dim), np.float32), np.arange(rows) % n_classes
    with LAYER_BUILD_LOCK:  # not while another thread creates layers: the seed would not give these weights
        keras.utils.set_random_seed(params.seed)
        model = _new_head(x, n_classes, params)
    data, labels, batch_size, _ = epoch_batches(x, y, params.batch_size, params.seed,
                                                repeated=uses_repeated_dataset(train_rows * feature_dim * 4))
    weights = balanced_class_weights(y, n_classes) if params.class_weights else None
    fit_with_hooks(model, data, labels, (x, y), 1, batch_size, weights, 1, "prepare", no_progress, never_cancel,
                   validation_in_hooks=True, steps_per_epoch=1)
    pool.give_back(model)


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               n_classes: int, params: HeadParams = HeadParams(),
               progress: ProgressFn = no_progress, cancel: CancelFn = never_cancel,
               pool: HeadPool | None = HEADS) -> tuple[keras.Model, dict]:
    """Train a head on features; return the model (best validation loss) and its history.

    With a `pool` (under TensorFlow), a head of the same shape that an earlier run gave back is
    reused (hand the model back with `pool.give_back` once it is saved); the result is the same as a
    fresh build's, to the bit.
    """
    # Only TensorFlow traces the train step (the other backends run it eagerly on the CPU), and only
    # there does a reused head draw the same random numbers as a fresh one (the tests check that).
    if keras.backend.backend() != "tensorflow":
        pool = None
    model = pool.take(_pool_key(x_train.shape[1], n_classes, params)) if pool is not None else None
    with LAYER_BUILD_LOCK:  # no other thread creates layers between the seed and these weights
        keras.utils.set_random_seed(params.seed)
        if model is None:
            model = _new_head(x_train, n_classes, params)
        else:
            _reset(model, x_train)
    weights = balanced_class_weights(y_train, n_classes) if params.class_weights else None
    data, labels, batch_size, steps = epoch_batches(x_train, y_train, params.batch_size, params.seed)
    try:
        history = fit_with_hooks(model, data, labels, (x_val, y_val), params.epochs, batch_size, weights,
                                 params.patience, "head", progress, cancel, validation_in_hooks=True,
                                 steps_per_epoch=steps)
    finally:
        _standardize_from_constants(model)
    return model, history


# Features up to this size go through one repeated tf.data pipeline (see `epoch_batches`).
REPEATED_DATASET_BYTES = 256 * 2**20


def uses_repeated_dataset(feature_bytes: int) -> bool:
    """Whether `fit` takes features of this size through one repeated tf.data pipeline (see `epoch_batches`)."""
    return keras.backend.backend() == "tensorflow" and feature_bytes <= REPEATED_DATASET_BYTES


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, repeated: bool | None = None) -> tuple:
    """What `fit` trains on: `(x, y, batch_size, steps_per_epoch)` for `model.fit`'s arguments.

    Under TensorFlow, Keras builds a new tf.data iterator for arrays every epoch (about 25 ms
    each, more than an epoch of a small head): features that fit comfortably in memory go
    through one reshuffled, repeated dataset instead, one iterator for the whole fit, each
    epoch still every image once. Other backends, and larger feature sets, take the arrays.
    `repeated` decides instead of the size of `x` (stand-in features that must trace what real ones will).
    """
    if not (uses_repeated_dataset(x.nbytes) if repeated is None else repeated):
        return x, y, batch_size, None
    import tensorflow as tf

    dataset = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size).repeat())
    return dataset, None, None, -(-len(x) // batch_size)


def head_probabilities(model: keras.Model, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities from features, through the model's traced predict function.

    Traced once per model (a batch shape or two, then any), a call costs about 0.6 ms of CPU
    where a direct eager call costs about 4.5 ms: serving calls it once per request and model.
    Training scores its recorded validation probabilities here too, so they are what serving answers.
    """
    if not getattr(model, "_traced_for_any_batch", False):
        warm_head(model)
    parts = [np.asarray(model.predict_on_batch(features[i:i + batch_size]))
             for i in range(0, len(features), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def warm_head(model: keras.Model) -> None:
    """Trace a head's predict function for any batch size (two sizes: the second generalises the first).

    Every later call then runs that one graph, whatever its batch size, as the service's batches
    and training's validation alike; a first trace for one concrete size would be another graph.
    """
    dim = model.input_shape[-1]
    for rows in (1, 2):
        model.predict_on_batch(np.zeros((rows, dim), np.float32))
    model._traced_for_any_batch = True
