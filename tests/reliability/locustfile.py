"""Locust users for the load run (tests/reliability/test_load.py starts locust headless with this file).

Each user sends one real image per request to the predict endpoint, back to back. An answer counts
as a failure unless it is a 200 with one prediction from a version in LOAD_VERSIONS (the versions
the run publishes and rolls back between).

    LOAD_IMAGES=folder LOAD_MODEL=digits LOAD_VERSIONS=1,2 locust -f tests/reliability/locustfile.py --headless ...
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, constant, task

IMAGES = [path.read_bytes() for path in sorted(Path(os.environ["LOAD_IMAGES"]).iterdir())]
MODEL = os.environ.get("LOAD_MODEL", "digits")
VERSIONS = {int(v) for v in os.environ.get("LOAD_VERSIONS", "1").split(",")}


class Predictor(HttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        image = random.choice(IMAGES)
        with self.client.post(f"/v1/models/{MODEL}/predict", files={"image": ("image.png", image, "image/png")},
                              name="predict", catch_response=True, timeout=60) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            if len(answer.get("predictions", [])) != 1 or answer.get("version") not in VERSIONS:
                response.failure(f"unexpected answer: {response.text[:200]}")
