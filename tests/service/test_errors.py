"""The one error table: every library error class answered with its status, code and Retry-After."""

from __future__ import annotations

import inspect
import logging

import pytest

from service import create_app
from service.errors import handle_error
from training import errors
from training.errors import (
    ArchiveError,
    Conflict,
    DatasetError,
    DatasetNotFoundError,
    IdempotencyConflictError,
    ImageError,
    InvalidInput,
    JobNotFoundError,
    ModelNotFoundError,
    ModelUnavailable,
    NotFound,
    Overloaded,
    PredictTimeout,
    StoreConflictError,
    StoreFullError,
    StoreUnavailable,
    TrainingError,
    Unavailable,
    UnsupportedImageError,
    WeightsError,
)
from training.settings import Settings

# error, status, code, Retry-After (None: no such header)
ANSWERS = [
    (TrainingError("job params must be JSON-able"), 400, "bad_request", None),
    (InvalidInput("model name must be 1-64 letters"), 400, "bad_request", None),
    (ImageError("image 0: truncated"), 400, "bad_request", None),
    (UnsupportedImageError("image 0: not an allowed image format"), 415, "unsupported_media_type", None),
    (ArchiveError("not a .zip or .tar.gz"), 400, "bad_request", None),
    (DatasetError("at least 2 classes"), 400, "bad_request", None),
    (NotFound("version 1 of 'x' has no plot 'y.png'"), 404, "not_found", None),
    (ModelNotFoundError("no model named 'x'"), 404, "not_found", None),
    (DatasetNotFoundError("no dataset with id 'x'"), 404, "not_found", None),
    (JobNotFoundError("no job with id 'x'"), 404, "not_found", None),
    (Conflict("conflict"), 409, "conflict", None),
    (StoreConflictError("version 1 of 'x' is published"), 409, "conflict", None),
    (IdempotencyConflictError("this Idempotency-Key was used"), 409, "conflict", None),
    (StoreFullError("disk full", 28), 507, "insufficient_storage", None),
    (WeightsError("no weights file"), 503, "unavailable", None),
    (Unavailable("try again"), 503, "unavailable", "5"),
    (Overloaded("prediction queue is full"), 503, "overloaded", "1"),
    (Overloaded("too many open event streams", retry_after=5), 503, "overloaded", "5"),
    (PredictTimeout("no answer within 30 s"), 503, "timeout", "5"),
    (ModelUnavailable("the batching thread has stopped"), 503, "unavailable", "5"),
    (StoreUnavailable("object store s3://b is unreachable (could not read x)"), 503, "store_unavailable", "10"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return create_app({"SETTINGS": Settings(model_dir=root / "models", data_dir=root / "data",
                                            backbone_weights="none"), "TESTING": True})


@pytest.mark.parametrize(("error", "status", "code", "retry_after"), ANSWERS,
                         ids=[type(answer[0]).__name__ + str(i) for i, answer in enumerate(ANSWERS)])
def test_each_library_error_has_its_status_code_and_retry_after(app, error, status, code, retry_after):
    with app.test_request_context("/v1/models"):
        response = handle_error(error)
    assert response.status_code == status
    assert response.get_json() == {"error": {"code": code, "message": error.message}}
    assert response.headers.get("Retry-After") == retry_after


def test_every_library_error_class_is_in_the_table_above():
    classes = {klass for _, klass in inspect.getmembers(errors, inspect.isclass) if issubclass(klass, TrainingError)}
    assert classes == {type(answer[0]) for answer in ANSWERS}


def test_invalid_input_is_a_value_error_but_a_bare_value_error_is_a_logged_500(app, caplog):
    assert isinstance(InvalidInput("x"), ValueError)
    with caplog.at_level(logging.ERROR, "service.errors"), app.test_request_context("/v1/models"):
        response = handle_error(ValueError("a bug"))
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    assert "a bug" not in response.get_data(as_text=True)
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in caplog.records)
