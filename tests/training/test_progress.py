"""The per-epoch history a running job's progress carries (the page's curves survive a reload)."""

from __future__ import annotations

import json

from training.progress import EpochHistory, Progress


def test_each_report_carries_every_epoch_so_far_per_phase():
    reports: list[dict] = []
    record = EpochHistory(reports.append)
    record(Progress("features", 2, 4))
    for epoch in (1, 2, 3):
        record(Progress("head", epoch, 10, epoch, {"loss": 1.0 / epoch, "val_accuracy": 0.123456789 * epoch}))
    record(Progress("fine-tune", 1, 5, 1, {"loss": 0.2}))
    record(Progress("save", 1, 1))
    assert reports[0] == {"phase": "features", "current": 2, "total": 4, "epoch": None, "metrics": None, "history": {}}
    last = json.loads(json.dumps(reports[-1]))  # stored as JSON in the job record
    assert last["phase"] == "save"
    assert last["history"] == {
        "head": {"epoch": [1, 2, 3], "loss": [1.0, 0.5, 0.33333], "val_accuracy": [0.12346, 0.24691, 0.37037]},
        "fine-tune": {"epoch": [1], "loss": [0.2]},
    }
    assert reports[2]["history"]["head"]["epoch"] == [1, 2]  # every report has the epochs up to it


def test_a_metric_missing_in_some_epochs_stays_aligned_and_a_restarted_phase_starts_over():
    reports: list[dict] = []
    record = EpochHistory(reports.append)
    record(Progress("head", 1, 3, 1, {"loss": 1.0}))
    record(Progress("head", 2, 3, 2, {"loss": 0.5, "val_loss": 0.7}))
    record(Progress("head", 3, 3, 3, {"val_loss": 0.6}))
    assert reports[-1]["history"]["head"] == {"epoch": [1, 2, 3], "loss": [1.0, 0.5, None],
                                              "val_loss": [None, 0.7, 0.6]}
    record(Progress("head", 1, 3, 1, {"loss": 0.9}))
    assert reports[-1]["history"]["head"] == {"epoch": [1], "loss": [0.9]}


def test_a_diverged_metric_is_stored_as_null_not_nan():
    reports: list[dict] = []
    EpochHistory(reports.append)(Progress("head", 1, 3, 1, {"loss": float("nan"), "accuracy": 0.5}))
    assert reports[-1]["history"]["head"] == {"epoch": [1], "loss": [None], "accuracy": [0.5]}
    json.dumps(reports[-1]["history"], allow_nan=False)
