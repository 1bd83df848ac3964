"""Hooks that let a caller (CLI, Celery task) watch and stop a training run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from training.errors import Cancelled


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report: a phase, how far it is, and the last epoch's metrics.

    Phases, in order: unpack, features, head, fine-tune (optional), evaluate, save.
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
