"""A cache of loaded models bounded by bytes, each loaded once however many requests ask at once.

Every entry is stored with an identity (for a model version, the identity of the
files it was loaded from): asked for with another identity, the entry is loaded
again and the old one closed, so nothing cached outlives the files it came from.
Past `max_bytes`, the least recently used entries are evicted and closed (their
batching threads finish the work already queued, then stop).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import gc
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from service.batching import own_copy


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it in its arenas otherwise: an evicted
    model would leave the process as large as before). A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class _Entry:
    value: Any
    nbytes: int
    identity: Hashable


def close_value(value: Any) -> None:
    """Close a cached value that has a `close` method."""
    close = getattr(value, "close", None)
    if close is not None:
        close()


class ModelCache:
    """Loaded values by key: LRU within `max_bytes`, single-flight loads, identity-checked hits."""

    def __init__(self, max_bytes: int, close: Callable[[Any], None] = close_value,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, received: {max_bytes}")
        self.max_bytes, self._close = max_bytes, close
        self.on_change = on_change or (lambda entries, nbytes: None)
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._loading: dict[Hashable, tuple[Future, Hashable]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, key: Hashable, identity: Hashable, load: Callable[[], tuple[Any, int]],
            expected_bytes: int = 0) -> Any:
        """The value under `key` with `identity`; `load()` -> (value, bytes) runs once for concurrent callers.

        `expected_bytes` (the size of what is about to load) makes room first, so that old
        and new models are not all in memory at once.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.identity == identity:
                    self._entries.move_to_end(key)
                    return entry.value
                flight = self._loading.get(key)
                if flight is None:
                    future: Future = Future()
                    self._loading[key] = (future, identity)
                    break
            future, loading_identity = flight
            try:
                value = future.result()
            except BaseException as exc:
                raise own_copy(exc) from None
            if loading_identity == identity:
                return value
            # The load in flight was for other files (replaced meanwhile): look again.
        self._make_room(expected_bytes)
        return self._load(key, identity, load, future)

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used entries until `nbytes` more would fit the bound."""
        with self._lock:
            gone = self._evict_over_bound(keep=None, limit=self.max_bytes - nbytes)
            self.nbytes = sum(entry.nbytes for entry in self._entries.values())
            counts = len(self._entries), self.nbytes
        if gone:
            self.on_change(*counts)
            self._close_later([entry.value for entry in gone])

    def _load(self, key: Hashable, identity: Hashable, load: Callable[[], tuple[Any, int]], future: Future) -> Any:
        """Run a load as the one caller in flight, store its value, evict past the bound, close what left."""
        try:
            value, nbytes = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            gone = [self._entries.pop(key)] if key in self._entries else []
            self._entries[key] = _Entry(value, int(nbytes), identity)
            gone += self._evict_over_bound(keep=key)
            self.nbytes = sum(entry.nbytes for entry in self._entries.values())
            counts = len(self._entries), self.nbytes
        future.set_result(value)
        self.on_change(*counts)
        self._close_later([entry.value for entry in gone])
        return value

    def _evict_over_bound(self, keep: Hashable | None, limit: int | None = None) -> list[_Entry]:
        """Pop least recently used entries (never `keep`) until the total fits `limit` (default `max_bytes`);
        the caller holds the lock."""
        limit = self.max_bytes if limit is None else limit
        evicted = []
        total = sum(entry.nbytes for entry in self._entries.values())
        for key in list(self._entries):
            if total <= limit:
                break
            if key != keep:
                entry = self._entries.pop(key)
                total -= entry.nbytes
                evicted.append(entry)
        return evicted

    def discard_where(self, stale: Callable[[Hashable, Hashable], bool]) -> int:
        """Evict and close every entry for which `stale(key, identity)` is true; return how many."""
        with self._lock:
            items = list(self._entries.items())
        gone = [key for key, entry in items if stale(key, entry.identity)]
        with self._lock:
            dropped = [self._entries.pop(key) for key in gone if key in self._entries]
            self.nbytes = sum(entry.nbytes for entry in self._entries.values())
            counts = len(self._entries), self.nbytes
        if dropped:
            self.on_change(*counts)
            self._close_later([entry.value for entry in dropped])
        return len(dropped)

    def values(self) -> list[Any]:
        """The cached values (a snapshot)."""
        with self._lock:
            return [entry.value for entry in self._entries.values()]

    def _close_later(self, values: list[Any]) -> None:
        """Close evicted values off the request thread: a batcher first finishes the work queued on it."""
        if values:
            threading.Thread(target=self._close_and_free, args=(values,), name="model-cache-close", daemon=True).start()

    def _close_and_free(self, values: list[Any]) -> None:
        """Close values, then collect them: a Keras model and its traced predict function reference each other,
        so its memory comes back only when the cycle collector runs, not when the last reference goes."""
        for value in values:
            self._close(value)
        values.clear()
        gc.collect()
        release_free_memory()

    def close(self) -> None:
        """Close every cached value now and empty the cache."""
        with self._lock:
            values = [entry.value for entry in self._entries.values()]
            self._entries.clear()
            self.nbytes = 0
        self._close_and_free(values)
