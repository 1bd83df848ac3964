"""Job test fixtures: a job store over the test's settings, and the Redis test database, emptied."""

from __future__ import annotations

import pytest

from tests.training.jobs.helpers import REDIS_URL
from training.jobs.records import JobStore


@pytest.fixture
def jobs(settings):
    store = JobStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer (CI starts one; run redis-server locally): {exc}",
                    pytrace=False)
    finally:
        client.close()
    return REDIS_URL
