"""Hardening fixtures: a trained model, a service inside a sentinel folder with its ingest worker, and the tally of
bad inputs.

The tally counts every hostile input sent (corpus cases, fuzz examples, schemathesis calls)
and, when the session ends, writes the `bad_inputs` reliability record (bench/reliability.py)
listing any that got an unexpected answer; the tests fail on those as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from bench.reliability import record
from service import create_app, extensions
from tests.hardening import corpus
from tests.training.jobs.helpers import start_ingest_worker, stop_worker
from training.data.dataset import IngestLimits
from training.options import parse_options
from training.pipeline import train
from training.settings import Settings

# Hypothesis (also under schemathesis) caches what it learns from the source; keep that out of the checkout.
set_hypothesis_home_dir(Path(__file__).resolve().parents[2] / "test-artifacts" / "hypothesis")


class Tally:
    """Bad inputs tried, by category, and those answered other than expected."""

    def __init__(self) -> None:
        self.by_category: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.cases: set[str] = set()
        self.extra: dict[str, object] = {}

    def add(self, category: str, problems: list[str] | None = None, name: str = "", count: int = 1) -> None:
        """Count `count` inputs of `category`; a case with problems is listed as unexpected."""
        self.by_category[category] += count
        if name:
            self.cases.add(name)
        if problems:
            self.unexpected.append(f"{category} {name}: {'; '.join(problems)}"[:500])

    def data(self) -> dict:
        return {"tried": sum(self.by_category.values()), "by_category": dict(sorted(self.by_category.items())),
                "unexpected": self.unexpected, "corpus_cases": len(self.cases),
                "recorded": datetime.now(UTC).isoformat(timespec="seconds"), **self.extra}


def whole_corpus_selected(session: pytest.Session) -> bool:
    """Whether this session runs every hardening test (no module, test or keyword left out)."""
    folder = Path(__file__).parent
    modules = {path.name for path in folder.glob("test_*.py")}
    selected = {Path(str(item.fspath)).name for item in session.items if Path(str(item.fspath)).parent == folder}
    return selected == modules and not session.config.getoption("keyword")


@pytest.fixture(scope="session")
def tally(request):
    """The session's tally; its record is written at the end of the session, also when a test failed.

    A run of only part of the corpus is recorded as `bad_inputs-partial`, so it never stands in for
    the whole run's figures (the report requires `bad_inputs`)."""
    counts = Tally()
    yield counts
    if counts.by_category:
        record("bad_inputs" if whole_corpus_selected(request.session) else "bad_inputs-partial", counts.data())


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, small_digits_dir) -> Path:
    """A model store holding the `digits` model (3 classes, 32 px, random backbone), trained once."""
    root = tmp_path_factory.mktemp("hardening-model")
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=root / "keras")
    train(small_digits_dir, corpus.MODEL, settings, parse_options({"image_size": 32, "epochs": 3}))
    return settings.model_dir


def limits() -> IngestLimits:
    """The ingest limits of the service under test."""
    return IngestLimits(max_entries=corpus.ARCHIVE_ENTRIES, max_total_bytes=corpus.ARCHIVE_MB * 2**20,
                        max_image_pixels=corpus.MAX_IMAGE_PIXELS, min_images_per_class=corpus.MIN_IMAGES_PER_CLASS)


def service_env(settings: Settings) -> dict[str, str]:
    """The environment variables that give a service process these settings."""
    return {"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir), "BACKBONE_WEIGHTS": "none",
            "KERAS_HOME": str(settings.keras_home), "TRAINING_API_KEY": corpus.TRAINING_KEY,
            "PREDICTION_API_KEY": corpus.PREDICTION_KEY, "MAX_UPLOAD_MB": str(corpus.UPLOAD_MB),
            "MAX_PREDICT_MB": str(corpus.PREDICT_MB),
            "MAX_ARCHIVE_MB": str(corpus.ARCHIVE_MB), "MAX_ARCHIVE_ENTRIES": str(corpus.ARCHIVE_ENTRIES),
            "MAX_IMAGE_PIXELS": str(corpus.MAX_IMAGE_PIXELS), "MIN_IMAGES_PER_CLASS": str(corpus.MIN_IMAGES_PER_CLASS),
            "CELERY_BROKER_URL": "", "DATABASE_URL": ""}


@dataclass
class Sentinel:
    """A folder around a service's (or the library's) data folder: only the data folder may change."""

    root: Path
    data_dir: Path
    settings: Settings | None = None

    def snapshot(self) -> dict[str, tuple]:
        """Every path under the root outside the data folder, with its mode (and a file's size and mtime)."""
        seen = {}
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            if here == self.data_dir:
                dirs[:] = []
                continue
            for name in dirs + files:
                path = here / name
                if path == self.data_dir:
                    continue
                info = path.lstat()
                # A folder's own size and time change with its entries, which are listed themselves.
                seen[str(path.relative_to(self.root))] = (info.st_mode,) if stat.S_ISDIR(info.st_mode) else \
                    (info.st_mode, info.st_size, info.st_mtime_ns)
        return seen

    def escapes(self) -> list[str]:
        """Files named by the corpus's escape attempts where they must not be: anywhere for EVIL, outside the data
        folder for THROUGH (also in /, /tmp and /etc)."""
        found = []
        for folder, _, files in os.walk(self.root):
            inside = Path(folder).is_relative_to(self.data_dir)
            found += [f"{folder}/{name}" for name in files
                      if name == corpus.EVIL or (name == corpus.THROUGH and not inside)]
        for folder in ("/", "/tmp", "/etc", str(self.root.parent)):
            found += [f"{folder}/{name}" for name in os.listdir(folder) if name in (corpus.EVIL, corpus.THROUGH)]
        return found


def victim_digest() -> str:
    return hashlib.sha256(Path(corpus.VICTIM).read_bytes()).hexdigest()


def hardened_settings(folder: Path) -> Settings:
    """Settings of a service under test: stores in `folder`, both keys, the corpus's limits, the embedded broker."""
    return Settings(model_dir=folder / "models", data_dir=folder / "data", backbone_weights="none",
                    keras_home=folder / "keras", training_api_key=corpus.TRAINING_KEY,
                    prediction_api_key=corpus.PREDICTION_KEY, max_upload_mb=corpus.UPLOAD_MB,
                    max_predict_mb=corpus.PREDICT_MB,
                    max_archive_mb=corpus.ARCHIVE_MB, max_archive_entries=corpus.ARCHIVE_ENTRIES,
                    max_image_pixels=corpus.MAX_IMAGE_PIXELS, min_images_per_class=corpus.MIN_IMAGES_PER_CLASS)


def make_sentinel(root: Path, trained_models: Path) -> Sentinel:
    """A sentinel folder holding a decoy file, the service's model store (a copy) and its empty data folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "decoy.txt").write_text("must stay as it is\n")
    settings = hardened_settings(root / "service")
    shutil.copytree(trained_models, settings.model_dir)
    settings.data_dir.mkdir(parents=True)
    return Sentinel(root, settings.data_dir, settings)


@pytest.fixture(scope="session")
def sentinel(tmp_path_factory, trained_models) -> Sentinel:
    """The in-process service's sentinel folder."""
    return make_sentinel(tmp_path_factory.mktemp("sentinel"), trained_models)


@contextlib.contextmanager
def ingest_worker(settings: Settings, log_file: Path) -> Iterator[None]:
    """A real Celery ingest worker for a service under test: its settings and limits, its embedded broker."""
    worker = start_ingest_worker(settings, None, log_file, env=service_env(settings))
    try:
        yield
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, log_file.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def app(sentinel, tmp_path_factory):
    """The service in-process, with both keys, small limits, the embedded broker under its data folder and an
    ingest worker on it (its log outside the sentinel folder, which must not change)."""
    app = create_app({"SETTINGS": sentinel.settings, "TESTING": True})
    with ingest_worker(sentinel.settings, tmp_path_factory.mktemp("ingest-log") / "ingest.log"):
        yield app
    extensions.close(app)
