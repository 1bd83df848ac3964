"""Service fixtures: a real tiny model trained once, apps over it, and clients."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest

from service import create_app, extensions
from training.options import parse_options
from training.pipeline import train
from training.settings import Settings

MODEL = "digits"


@pytest.fixture(scope="session")
def trained_settings(tmp_path_factory, small_digits_dir) -> Settings:
    """Settings over a store holding a real `digits` model (3 classes, 32 px, random backbone)."""
    root = tmp_path_factory.mktemp("service")
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=root / "keras")
    train(small_digits_dir, MODEL, settings, parse_options({"image_size": 32, "epochs": 5}))
    return settings


@pytest.fixture(scope="session")
def app(trained_settings):
    """One app over the trained store, shared by the tests that do not change the store."""
    app = create_app({"SETTINGS": trained_settings, "TESTING": True})
    yield app
    extensions.close(app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def digit_pngs(small_digits_dir) -> dict[str, bytes]:
    """One PNG file's bytes per class label."""
    return {folder.name: sorted(folder.glob("*.png"))[0].read_bytes()
            for folder in sorted(small_digits_dir.iterdir()) if folder.is_dir()}


@pytest.fixture
def store_settings(trained_settings, tmp_path) -> Settings:
    """Settings over a private copy of the trained store, with a second version (a copy of the first)."""
    models = tmp_path / "models"
    shutil.copytree(trained_settings.model_dir, models)
    shutil.copytree(models / MODEL / "1", models / MODEL / "2")
    return dataclasses.replace(trained_settings, model_dir=models)


@pytest.fixture
def store_client(store_settings):
    """A client of an app whose store the test may change (publish, delete)."""
    return create_app({"SETTINGS": store_settings, "TESTING": True}).test_client()


class FakeRuntime:
    """Stands in for ModelRuntime where a test needs a runtime's answer or error, not a model."""

    def __init__(self, error: Exception | None = None, readiness: dict[str, str] | None = None) -> None:
        self.error, self.ready, self.calls = error, readiness or {"backbone": "ok"}, []

    def predict(self, name, images, version=None, top_k=3):
        self.calls.append(("predict", name, len(images), version, top_k))
        if self.error:
            raise self.error
        return {"model": name, "version": version or 1,
                "predictions": [{"label": "a", "probability": 1.0, "top_k": [{"label": "a", "probability": 1.0}]}
                                for _ in images]}

    def predict_many(self, names, images, top_k=3):
        self.calls.append(("predict_many", tuple(names), len(images), top_k))
        return {"results": [self.predict(name, images, top_k=top_k) for name in names]}

    def readiness(self):
        return self.ready

    def close(self):
        pass


@pytest.fixture
def fake_app(tmp_path):
    """An app over an empty store whose runtime is a FakeRuntime (no TensorFlow)."""
    def make(runtime: FakeRuntime | None = None, **settings):
        settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", backbone_weights="none",
                            **settings)
        app = create_app({"SETTINGS": settings, "TESTING": True})
        app.extensions["runtime"].set(runtime or FakeRuntime())
        return app

    return make


@pytest.fixture
def log_lines():
    """Collect what a `service.*` logger writes, as JSON lines (those loggers do not propagate to caplog)."""
    from service.logs import JsonFormatter

    attached: list[tuple[logging.Logger, logging.Handler]] = []
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    def collect(name: str) -> list[str]:
        handler = Collect()
        handler.setFormatter(JsonFormatter())
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        attached.append((logger, handler))
        return lines

    yield collect
    for logger, handler in attached:
        logger.removeHandler(handler)
