"""One error hierarchy for the training library.

Every error a user can cause (bad data, bad arguments, missing weights) is a
`TrainingError`: callers (CLI, Celery task, HTTP layer) show its message as is and
never a traceback. `status` is the HTTP status the service maps it to.
"""


class TrainingError(Exception):
    """An error caused by input or environment, with a message meant for the user."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageError(TrainingError):
    """An image that cannot be decoded or is not allowed (format, size)."""

    status = 400


class UnsupportedImageError(ImageError):
    """Bytes that are not one of the allowed image formats."""

    status = 415


class ArchiveError(TrainingError):
    """A dataset archive that is unsafe, corrupt or over a limit."""

    status = 400


class DatasetError(TrainingError):
    """A dataset that cannot be trained on (too few classes or images)."""

    status = 400


class WeightsError(TrainingError):
    """Backbone weights that cannot be found or loaded."""

    status = 503


class ModelNotFoundError(TrainingError):
    """A model or version that is not in the store."""

    status = 404


class StoreConflictError(TrainingError):
    """A store change that conflicts with its current state."""

    status = 409


class StoreFullError(TrainingError, OSError):
    """The model store's disk is full (ENOSPC) or over quota; nothing was written.

    Still an OSError with the errno it came from, for callers that handle OS errors.
    """

    status = 507

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class Cancelled(Exception):
    """Training was cancelled by its cancel check; nothing was written."""
