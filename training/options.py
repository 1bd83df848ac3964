"""Training options by name, shared by the CLI flags, the API's JSON and its form fields.

`parse_options` turns a flat mapping of option names (strings from a form, or typed
values from JSON or argparse) into `TrainParams`, rejecting unknown names and bad
values with a message that names the option.
"""

from __future__ import annotations

from collections.abc import Mapping

from training.errors import InvalidInput
from training.finetune import FineTuneParams
from training.head import HeadParams
from training.pipeline import TrainParams

TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

# option name -> (type, which params object, field name there)
OPTIONS: dict[str, tuple[type, str, str]] = {
    "epochs": (int, "head", "epochs"),
    "batch_size": (int, "head", "batch_size"),
    "optimizer": (str, "head", "optimizer"),
    "learning_rate": (float, "head", "learning_rate"),
    "hidden_units": (int, "head", "hidden_units"),
    "dropout": (float, "head", "dropout"),
    "batch_norm": (bool, "head", "batch_norm"),
    "l2": (float, "head", "l2"),
    "patience": (int, "head", "patience"),
    "class_weights": (bool, "head", "class_weights"),
    "image_size": (int, "train", "image_size"),
    "feature_layer": (str, "train", "feature_layer"),
    "val_split": (float, "train", "val_split"),
    "seed": (int, "train", "seed"),
    "publish": (str, "train", "publish"),
    "fine_tune": (bool, "fine_tune", ""),
    "fine_tune_epochs": (int, "fine_tune", "epochs"),
    "fine_tune_learning_rate": (float, "fine_tune", "learning_rate"),
    "unfreeze_blocks": (int, "fine_tune", "unfreeze_blocks"),
    "freeze_first": (int, "fine_tune", "freeze_first"),
    "augment": (bool, "fine_tune", "augment"),
    "fine_tune_keep": (str, "fine_tune", "keep"),
}


def _coerce(name: str, kind: type, value):
    """Convert one option value to its type, or raise InvalidInput naming it."""
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            if text.lower() in TRUE | FALSE:
                return text.lower() in TRUE
        else:
            try:
                return kind(text)
            except ValueError:
                pass
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is not bool and isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise InvalidInput(f"{name} must be a {'boolean' if kind is bool else kind.__name__}, received: {value!r}")


def normalize_options(options: Mapping) -> dict:
    """Known option names with typed values (form strings converted); None values dropped."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidInput(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    return {name: _coerce(name, OPTIONS[name][0], value) for name, value in options.items() if value is not None}


def parse_options(options: Mapping) -> TrainParams:
    """Build TrainParams from option names and values; None values mean 'default'."""
    groups: dict[str, dict] = {"head": {}, "train": {}, "fine_tune": {}}
    fine_tune = False
    for name, value in normalize_options(options).items():
        _, group, field = OPTIONS[name]
        if name == "fine_tune":
            fine_tune = value
        else:
            groups[group][field] = value
    if groups["fine_tune"] and not fine_tune:
        raise InvalidInput(f"{', '.join(groups['fine_tune'])} need fine_tune to be on")
    return TrainParams(head=HeadParams(**groups["head"]),
                       fine_tune=FineTuneParams(**groups["fine_tune"]) if fine_tune else None,
                       **groups["train"])
