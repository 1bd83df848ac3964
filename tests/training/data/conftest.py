"""Dataset test fixtures: a seeded random generator for the images the tests make."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
