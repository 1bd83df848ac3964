"""One error hierarchy for the training library, by meaning.

Every error a user can cause (bad data, bad arguments, a missing model, missing weights) is
a `TrainingError`: callers (CLI, Celery task, HTTP layer) show its message as is and never a
traceback. The library knows no HTTP: the service maps these classes to statuses in one
table (`service.errors.STATUSES`), so a class says what went wrong, never how to answer it.
"""


class TrainingError(Exception):
    """An error caused by input or environment, with a message meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TrainingError, ValueError):
    """Input that breaks a rule: an image, archive, dataset, option, name or id.

    Also a ValueError, as Keras' argument checks raise, so callers that check arguments
    with `except ValueError` keep working.
    """


class ImageError(InvalidInput):
    """An image that cannot be decoded or is not allowed (format, size)."""


class UnsupportedImageError(ImageError):
    """Bytes that are not one of the allowed image formats."""


class ArchiveError(InvalidInput):
    """A dataset archive that is unsafe, corrupt or over a limit."""


class DatasetError(InvalidInput):
    """A dataset that cannot be trained on (too few classes or images)."""


class NotFound(TrainingError):
    """Something named that does not exist."""


class ModelNotFoundError(NotFound):
    """A model or version that is not in the store."""


class DatasetNotFoundError(NotFound):
    """A dataset id that is not in the store."""


class JobNotFoundError(NotFound):
    """A job id that is not in the job store."""


class Conflict(TrainingError):
    """A change that conflicts with the current state."""


class StoreConflictError(Conflict):
    """A store change that conflicts with its current state."""


class IdempotencyConflictError(StoreConflictError):
    """An idempotency key already used for a job with another model, dataset or options."""


class StoreFullError(TrainingError, OSError):
    """The model store's disk is full (ENOSPC) or over quota; nothing was written.

    Still an OSError with the errno it came from, for callers that handle OS errors.
    """

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class WeightsError(TrainingError):
    """Backbone weights that cannot be found or loaded."""


class Unavailable(TrainingError):
    """Something that cannot answer now but may soon; `retry_after` says in how many seconds to try again."""

    retry_after = 5

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class Overloaded(Unavailable):
    """More work than this process takes now (a full prediction queue, every event-stream slot taken)."""

    retry_after = 1


class PredictTimeout(Unavailable):
    """A prediction waited longer than PREDICT_TIMEOUT_S for its forward pass."""


class ModelUnavailable(Unavailable):
    """A model that cannot run now: its batching thread stopped, its forward pass hangs, or it keeps being unloaded."""


class StoreUnavailable(Unavailable):
    """The shared object store (STORE_URL) or its job database cannot be reached or answers with an error."""

    retry_after = 10


class Cancelled(Exception):
    """Training was cancelled by its cancel check; nothing was written."""
