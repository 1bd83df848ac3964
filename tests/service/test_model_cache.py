"""The runtime's model cache: bounded by bytes, one load per key however many ask, nothing outlives its files."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.model_cache import ModelCache


class Thing:
    """A cached value that records whether it was closed."""

    def __init__(self, name: str) -> None:
        self.name, self.closed = name, threading.Event()

    def close(self) -> None:
        self.closed.set()


def loader(name: str, nbytes: int, calls: list | None = None, delay: float = 0.0):
    def load():
        if calls is not None:
            calls.append(name)
        time.sleep(delay)
        return Thing(name), nbytes
    return load


def test_concurrent_first_requests_load_once():
    cache, calls = ModelCache(1000), []
    with ThreadPoolExecutor(16) as pool:
        values = list(pool.map(lambda _: cache.get("a", 1, loader("a", 10, calls, delay=0.2)), range(16)))
    assert calls == ["a"]
    assert all(value is values[0] for value in values)


def test_a_failed_load_fails_every_waiter_with_its_own_error_and_is_tried_again():
    cache, attempts = ModelCache(1000), []

    def broken():
        attempts.append(1)
        time.sleep(0.2)
        raise OSError("disk went away")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get, "a", 1, broken) for _ in range(4)]
        errors = [f.exception(5) for f in futures]
    assert len(attempts) == 1
    assert all(isinstance(e, OSError) and "disk went away" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 4
    assert cache.get("a", 1, loader("a", 10)).name == "a"  # nothing cached from the failure


def test_evicts_least_recently_used_past_the_byte_bound_and_closes_it():
    cache = ModelCache(100)
    a = cache.get("a", 1, loader("a", 40))
    b = cache.get("b", 1, loader("b", 40))
    cache.get("a", 1, loader("a", 40))  # a is now the most recently used
    c = cache.get("c", 1, loader("c", 40))
    assert b.closed.wait(5) and not a.closed.is_set() and not c.closed.is_set()
    assert cache.nbytes == 80 and {v.name for v in cache.values()} == {"a", "c"}


def test_makes_room_before_loading_what_is_expected():
    cache, seen = ModelCache(100), []
    cache.get("a", 1, loader("a", 60))

    def load_b():
        seen.append({v.name for v in cache.values()})  # what is resident while b loads
        return Thing("b"), 60

    cache.get("b", 1, load_b, expected_bytes=60)
    assert seen == [set()]


def test_one_value_over_the_bound_is_still_served():
    cache = ModelCache(10)
    assert cache.get("huge", 1, loader("huge", 500)).name == "huge"
    assert cache.get("huge", 1, loader("other", 500)).name == "huge"  # a hit, not a reload


def test_another_identity_reloads_and_closes_the_old_value():
    cache, calls = ModelCache(1000), []
    old = cache.get("v1", ("inode", 1), loader("old", 10, calls))
    assert cache.get("v1", ("inode", 1), loader("old", 10, calls)) is old
    new = cache.get("v1", ("inode", 2), loader("new", 10, calls))
    assert new.name == "new" and calls == ["old", "new"]
    assert old.closed.wait(5) and cache.nbytes == 10


def test_discard_where_evicts_stale_entries():
    cache = ModelCache(1000)
    kept, gone = cache.get("kept", 1, loader("kept", 1)), cache.get("gone", 1, loader("gone", 1))
    assert cache.discard_where(lambda key, identity: key == "gone") == 1
    assert gone.closed.wait(5) and not kept.closed.is_set()
    assert [v.name for v in cache.values()] == ["kept"]


def test_reports_what_it_holds():
    reports = []
    cache = ModelCache(100, on_change=lambda entries, nbytes: reports.append((entries, nbytes)))
    cache.get("a", 1, loader("a", 60))
    cache.get("b", 1, loader("b", 60))
    assert reports == [(1, 60), (1, 60)]


def test_bound_must_be_positive():
    with pytest.raises(ValueError, match="received: 0"):
        ModelCache(0)
