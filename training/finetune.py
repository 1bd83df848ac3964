"""Optional fine-tuning: unfreeze the top of VGG19 and train end to end on images.

Run only after the head has converged on cached features (a random head would
send large gradients into the pretrained layers). The model is recompiled after
`trainable` changes, trained with a low learning rate and light augmentation, and
saved whole (backbone + head), since its backbone no longer matches the shared one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np

from training.errors import InvalidInput
from training.features import Loader, load_batch
from training.head import balanced_class_weights, fit_with_hooks, make_optimizer, top_k_metric
from training.progress import CancelFn, ProgressFn, never_cancel, no_progress

VGG19_BLOCKS = ("block1", "block2", "block3", "block4", "block5")


@dataclasses.dataclass(frozen=True)
class FineTuneParams:
    """How much of the backbone to unfreeze and how to train it."""

    epochs: int = 5
    learning_rate: float = 1e-4
    optimizer: str = "nesterov"
    batch_size: int = 16
    unfreeze_blocks: int = 1      # the top N conv blocks (block5 = 1)
    freeze_first: int | None = None  # or: all layers but the first N, as in the classic recipe
    augment: bool = True
    patience: int = 3
    keep: str = "better"  # better: keep it only if it beats the head on validation; always

    def __post_init__(self) -> None:
        if not 1 <= self.unfreeze_blocks <= len(VGG19_BLOCKS):
            raise InvalidInput(f"unfreeze_blocks must be 1 to 5, received: {self.unfreeze_blocks!r}")
        if self.freeze_first is not None and self.freeze_first < 0:
            raise InvalidInput(f"freeze_first must be 0 or more, received: {self.freeze_first!r}")
        if not 1 <= self.epochs <= 1000:
            raise InvalidInput(f"fine_tune_epochs must be 1 to 1000, received: {self.epochs!r}")
        if self.keep not in ("better", "always"):
            raise InvalidInput(f"fine_tune_keep must be 'better' or 'always', received: {self.keep!r}")
        if not 0 < self.learning_rate <= 1:
            raise InvalidInput(f"fine_tune_learning_rate must be in (0, 1], received: {self.learning_rate!r}")


class ImageBatches(keras.utils.PyDataset):
    """Batches of preprocessed images and labels, loaded on demand by `load`, ahead of the training step.

    Two loader threads prepare the next batches while the backbone trains on the current one.
    """

    def __init__(self, paths: Sequence, labels: np.ndarray, load: Loader, batch_size: int,
                 shuffle: bool, seed: int = 0) -> None:
        super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)
        self.paths, self.labels, self.load = list(paths), np.asarray(labels), load
        self.batch_size, self.shuffle = batch_size, shuffle
        self.order = np.arange(len(self.paths))
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.load([self.paths[i] for i in chosen]), self.labels[chosen]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


def set_trainable_layers(backbone_model, params: FineTuneParams) -> list[str]:
    """Unfreeze the chosen backbone layers; return their names."""
    backbone_model.trainable = True
    layers = backbone_model.layers
    if params.freeze_first is not None:
        trainable = {layer.name for layer in layers[params.freeze_first:]}
    else:
        top_blocks = VGG19_BLOCKS[-params.unfreeze_blocks:]
        trainable = {layer.name for layer in layers
                     if not layer.name.startswith(VGG19_BLOCKS) or layer.name.startswith(top_blocks)}
    for layer in layers:
        layer.trainable = layer.name in trainable
    return [layer.name for layer in layers if layer.trainable and layer.weights]


def copy_model(model: keras.Model, workdir: str | Path | None = None) -> keras.Model:
    """An independent copy of `model` with every layer's state, through a save/load round trip.

    `clone_model` + `set_weights` is not enough: Keras' `Normalization` keeps the mean and
    variance it standardizes with in tensors derived from its weights, which only loading
    (or `finalize_state`) refreshes, so such a copy would see unstandardized features.
    """
    with tempfile.TemporaryDirectory(dir=workdir, prefix="copy-") as folder:
        path = Path(folder) / f"{model.name}.keras"
        model.save(path)
        return keras.saving.load_model(path, compile=False, safe_mode=True)


def freeze_normalization(model: keras.Model) -> None:
    """Keep batch normalization in inference mode: a frozen BatchNormalization uses its moving statistics.

    Fine-tuning feeds augmented image batches; in training mode the head's batch
    normalization would drag its moving statistics towards them, away from what the
    head saw while it converged and from what inference will see (the Keras
    transfer-learning guide does the same).
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def build_whole_model(backbone_model, head: keras.Model, image_size: int) -> keras.Model:
    """Chain backbone and head into one model from preprocessed pixels to probabilities."""
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    return keras.Model(inputs, head(backbone_model(inputs)), name="finetuned")


def augmentation() -> keras.Sequential:
    """Light augmentation: horizontal flip, small rotation and zoom."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.05, fill_mode="constant"),
        keras.layers.RandomZoom(0.1, fill_mode="constant"),
    ], name="augment")


def fine_tune(backbone_model, head: keras.Model, image_size: int, n_classes: int,
              train: tuple[Sequence, np.ndarray], val: tuple[Sequence, np.ndarray],
              params: FineTuneParams = FineTuneParams(), progress: ProgressFn = no_progress,
              cancel: CancelFn = never_cancel,
              workdir: str | Path | None = None,
              load: Loader | None = None) -> tuple[keras.Model, dict, list[str]]:
    """Train backbone top and head end to end; return the whole model, history and unfrozen layers.

    `load` gives a batch of files' pixels (default: decode them each time; the pipeline passes its
    `DecodedImages.batch`, so each image is decoded once for every epoch and the validation after).
    """
    # Copies: the process's shared, frozen backbone is left untouched, and the head-only
    # model stays as it was, as the fallback and the baseline it is compared with.
    backbone_copy = copy_model(backbone_model, workdir)
    unfrozen = set_trainable_layers(backbone_copy, params)
    head_copy = copy_model(head, workdir)
    freeze_normalization(head_copy)
    model = build_whole_model(backbone_copy, head_copy, image_size)
    trainer = model
    if params.augment:
        inputs = keras.Input((image_size, image_size, 3), name="pixels")
        trainer = keras.Model(inputs, model(augmentation()(inputs)), name="finetune_trainer")
    # Recompile after changing `trainable`, with a low learning rate; clipping keeps one
    # large gradient from undoing pretrained layers.
    trainer.compile(optimizer=make_optimizer(params.optimizer, params.learning_rate, clipnorm=1.0),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy", top_k_metric(n_classes)])
    pool = None
    if load is None:
        pool = ThreadPoolExecutor(max_workers=4)
        load = functools.partial(load_batch, image_size=image_size, pool=pool)
    train_batches = ImageBatches(train[0], train[1], load, params.batch_size, shuffle=True)
    val_batches = ImageBatches(val[0], val[1], load, params.batch_size, shuffle=False)
    weights = balanced_class_weights(np.asarray(train[1]), n_classes)
    try:
        history = fit_with_hooks(trainer, train_batches, None, val_batches, params.epochs, None, weights,
                                 params.patience, "fine-tune", progress, cancel)
    finally:
        if pool is not None:
            pool.shutdown(wait=False)
    return model, history, unfrozen
