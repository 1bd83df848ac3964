"""schemathesis against the service's own /openapi.json: no server errors, answers as documented.

Every operation is called with generated valid and invalid input (bounded, derandomized) on
the Flask app in-process with the training key. The app has its own store and data folder
(a copy of the trained model; the embedded filesystem broker under its data folder, so a
training request never reaches a real broker and no worker runs it).

The schema is loaded when the module is imported (schemathesis' lazy fixture loader does
not work with pytest 9), so the app is built then, over a temporary folder that the module
fixture fills with the trained model and removes at the end.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service import create_app, extensions
from tests.hardening import corpus
from tests.hardening.conftest import hardened_settings

AUTH = {"Authorization": f"Bearer {corpus.TRAINING_KEY}"}
FOLDER = Path(tempfile.mkdtemp(prefix="hardening-schemathesis-"))
atexit.register(shutil.rmtree, FOLDER, True)
SETTINGS = hardened_settings(FOLDER)
APP = create_app({"SETTINGS": SETTINGS, "TESTING": True})
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def served_store(trained_models):
    """Give the app the trained model; release its runtime, database and broker afterwards."""
    shutil.copytree(trained_models, SETTINGS.model_dir, dirs_exist_ok=True)
    SETTINGS.data_dir.mkdir(parents=True, exist_ok=True)
    yield
    extensions.close(APP)
    shutil.rmtree(FOLDER, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=False,
          suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case, tally):
    try:
        response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error, response_schema_conformance])
        statuses = tally.extra.setdefault("schemathesis_statuses", {})
        statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
    except Exception as exc:
        tally.add("schemathesis", [f"{case.method} {case.path}: {str(exc).splitlines()[0]}"[:300]], "")
        raise
    tally.add("schemathesis")
