"""Micro-batching: concurrent requests' images go through one forward call.

A backbone forward on a batch of 16 costs far less than 16 forwards of one, so a
single thread owns the model and gathers the rows of waiting requests (up to
`max_batch_size` rows, waiting at most `max_wait_ms` for more once it has some).
The queue is bounded in rows: when it is full, `submit` fails at once with
`Overloaded` (503 + Retry-After) instead of letting requests time out.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from service.errors import Overloaded


@dataclasses.dataclass
class _Request:
    rows: np.ndarray
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Run `forward` on batches gathered from concurrent `submit` calls."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, max_queue_rows: int = 256, name: str = "batcher",
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1 and max_wait_ms >= 0, received: "
                             f"{max_batch_size}, {max_queue_rows}, {max_wait_ms}")
        self.forward, self.max_batch_size = forward, max_batch_size
        self.max_wait, self.max_queue_rows = max_wait_ms / 1000.0, max_queue_rows
        self.on_batch = on_batch or (lambda batch_rows, queued_rows: None)
        self._pending: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a forward pass."""
        return self._queued_rows

    def submit(self, rows: np.ndarray) -> np.ndarray:
        """Queue rows for the next batch and wait for their outputs (in order)."""
        request = _Request(np.asarray(rows))
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if self._queued_rows + len(request.rows) > self.max_queue_rows and self._queued_rows:
                raise Overloaded(f"prediction queue is full ({self._queued_rows} images waiting), retry shortly")
            self._pending.append(request)
            self._queued_rows += len(request.rows)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _take_batch(self) -> list[_Request] | None:
        """Wait for requests and gather up to max_batch_size rows, waiting at most max_wait for more."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait
            while self._queued_rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_batch_size):
                request = self._pending.popleft()
                batch.append(request)
                rows += len(request.rows)
            self._queued_rows -= rows
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            rows = np.concatenate([r.rows for r in batch])
            self.on_batch(len(rows), self._queued_rows)
            try:
                # One oversized request is split so no forward exceeds max_batch_size.
                outputs = np.concatenate([self.forward(rows[i:i + self.max_batch_size])
                                          for i in range(0, len(rows), self.max_batch_size)])
            except BaseException as exc:  # Every waiting request gets the error, the thread lives on.
                for request in batch:
                    request.error = exc
                    request.done.set()
                continue
            start = 0
            for request in batch:
                request.result = outputs[start:start + len(request.rows)]
                start += len(request.rows)
                request.done.set()

    def close(self) -> None:
        """Finish queued work and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
