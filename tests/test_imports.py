"""Importing is free: no module connects or creates files, and the job system, the dataset modules (all an ingest
worker runs) and the web app import no TensorFlow.

Each check runs in a fresh interpreter, so nothing an earlier test imported or built can hide a side effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.live import ROOT

# Imports every module under training/ and service/ with connecting refused (and recorded); prints what it did.
IMPORT_EVERYTHING = """
import importlib, json, pkgutil, socket

attempts = []

def refuse(self, address, *args):
    attempts.append(repr(address))
    raise OSError("importing a module must not connect")

socket.socket.connect = socket.socket.connect_ex = refuse
modules = []
for package in ("training", "service"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if info.name.rpartition(".")[2] != "__main__":  # `python -m` entry points run their command
            importlib.import_module(info.name)
            modules.append(info.name)
print(json.dumps({"modules": modules, "connects": attempts}))
"""

# Imports the job system's and the dataset modules and builds the web app, then fails naming TensorFlow or Keras if
# they came along.
IMPORT_LIGHT = """
import importlib, pkgutil, sys
import training.data, training.jobs
from service import create_app

for package in (training.jobs, training.data):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.rpartition(".")[2] != "__main__":
            importlib.import_module(info.name)
create_app()
heavy = [name for name in ("tensorflow", "keras") if name in sys.modules]
sys.exit(f"imported {heavy}" if heavy else 0)
"""


def run_python(code: str, cwd: Path, data: Path, keras_home: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose settings point every folder into `data`."""
    env = {key: value for key, value in os.environ.items() if key not in ("CELERY_BROKER_URL", "DATABASE_URL")}
    # Unset broker and database URLs mean the embedded broker and SQLite: both files under DATA_DIR.
    env.update(DATA_DIR=str(data / "data"), MODEL_DIR=str(data / "models"), KERAS_HOME=str(keras_home),
               PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_importing_any_module_connects_to_nothing_and_creates_no_files(tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    # Keras writes its own keras.json when first imported: into a folder of its own, not the watched one.
    done = run_python(IMPORT_EVERYTHING, watched, watched, tmp_path / "keras")

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert {"training.jobs.worker", "training.jobs.tasks", "training.data.store", "service.extensions"} <= \
        set(report["modules"])
    assert report["connects"] == []
    assert sorted(watched.rglob("*")) == []


def test_the_job_system_and_the_web_app_import_no_tensorflow(tmp_path):
    done = run_python(IMPORT_LIGHT, tmp_path, tmp_path, tmp_path / "keras")
    assert done.returncode == 0, done.stderr[-3000:]
