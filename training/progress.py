"""Hooks that let a caller (CLI, Celery task) watch and stop a training run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from training.errors import Cancelled


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report: a phase, how far it is, and the last epoch's metrics.

    Phases, in order: ingest (a folder or archive; for a job, a stored dataset no worker ingested yet),
    features, head, fine-tune (optional), evaluate, save.
    """

    phase: str
    current: int
    total: int
    epoch: int | None = None
    metrics: dict[str, float] | None = None

    def as_dict(self) -> dict:
        """Return the JSON-able form used by job records."""
        return dataclasses.asdict(self)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    """Ignore progress reports."""


def never_cancel() -> bool:
    """Never ask to stop."""
    return False


def raise_if_cancelled(cancel: CancelFn) -> None:
    """Raise `Cancelled` when the cancel check says so."""
    if cancel():
        raise Cancelled("training was cancelled")


class EpochHistory:
    """Pass progress on with every epoch's metrics so far, per phase, so curves survive a page reload.

    Adds `history: {phase: {"epoch": [...], metric: [...]}}` to the progress dict; values are
    rounded to 5 significant digits to keep the record small (a 300-epoch job: about 15 KB).
    """

    def __init__(self, report: Callable[[dict], object]) -> None:
        self.report = report
        self.history: dict[str, dict[str, list]] = {}

    def __call__(self, progress: Progress) -> None:
        if progress.epoch is not None and progress.metrics:
            series = self.history.setdefault(progress.phase, {"epoch": []})
            # Early stopping never repeats an epoch, but a restarted phase would: keep epochs increasing.
            if series["epoch"] and progress.epoch <= series["epoch"][-1]:
                series.clear()
                series["epoch"] = []
            count = len(series["epoch"])
            series["epoch"].append(progress.epoch)
            for key, value in progress.metrics.items():
                # NaN (a diverged loss) is not JSON: stored as null, a gap in the curve.
                series.setdefault(key, [None] * count).append(float(f"{value:.5g}") if math.isfinite(value) else None)
            for values in series.values():  # a metric missing this epoch stays aligned
                values.extend([None] * (count + 1 - len(values)))
        history = {phase: {key: list(values) for key, values in series.items()}
                   for phase, series in self.history.items()}  # a snapshot: later epochs must not change it
        self.report({**progress.as_dict(), "history": history})
