"""Micro-batching: concurrent requests' images go through one forward call.

A backbone forward on a batch of 16 costs far less than 16 forwards of one, so a
single thread owns the model and gathers the rows of waiting requests (up to
`max_batch_size` rows, waiting at most `max_wait_ms` for more once it has some).
The queue is bounded in rows: when it is full, `submit` fails at once with
`Overloaded` (the service answers 503 + Retry-After) instead of letting requests time out.

Nobody waits forever: every caller gets its rows' outputs or its own error, the
thread survives whatever one batch raises, a caller gives up after `timeout_s`
(`PredictTimeout`), and `problem()` tells readiness when the thread died or a
forward pass has been running for longer than that. It raises library errors
and imports no Flask: HTTP statuses live in `service.errors`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from training.errors import ModelUnavailable, Overloaded, PredictTimeout

logger = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher was closed (its model evicted or the process stopping); fetch the model again."""


@dataclasses.dataclass(eq=False)
class _Request:
    rows: np.ndarray
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


def own_copy(error: BaseException) -> BaseException:
    """A copy of `error` for one waiter, caused by the original.

    One exception object raised in several threads at once would collect all their
    tracebacks; each waiter raises its own. An error that cannot be copied (a
    constructor with other arguments) becomes a RuntimeError naming it.
    """
    try:
        clone = copy.copy(error)
    except Exception:
        clone = None
    if clone is None or clone is error or type(clone) is not type(error):
        clone = RuntimeError(f"{type(error).__name__}: {error}")
    clone.__cause__ = error
    return clone


def padded_sizes(max_rows: int) -> tuple[int, ...]:
    """The batch sizes padding rounds up to: the powers of two below `max_rows`, then `max_rows`."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    return (*sizes, max_rows) if max_rows > 1 else (1,)


def padded(forward: Callable[[np.ndarray], np.ndarray], sizes: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`forward` run on batches padded with zero rows up to the next of `sizes`; outputs of the real rows only.

    A compiler that specialises on shapes (XLA under JAX) compiles once per batch size, a few
    seconds each on a GPU: padding lets it see only the few `sizes`. Rows never influence each
    other in inference, so the real rows' outputs are what they would be unpadded.
    """
    def run(rows: np.ndarray) -> np.ndarray:
        size = next((s for s in sizes if s >= len(rows)), len(rows))
        if size == len(rows):
            return forward(rows)
        filler = np.zeros((size - len(rows), *rows.shape[1:]), rows.dtype)
        return forward(np.concatenate([rows, filler]))[:len(rows)]

    return run


class MicroBatcher:
    """Run `forward` on batches gathered from concurrent `submit` calls."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, max_queue_rows: int = 256, name: str = "batcher",
                 on_batch: Callable[[int, int], None] | None = None, timeout_s: float = 30.0) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1, max_wait_ms >= 0 and timeout_s > 0, "
                             f"received: {max_batch_size}, {max_queue_rows}, {max_wait_ms}, {timeout_s}")
        self.forward, self.max_batch_size, self.name = forward, max_batch_size, name
        self.max_wait, self.max_queue_rows, self.timeout_s = max_wait_ms / 1000.0, max_queue_rows, timeout_s
        self.on_batch = on_batch or (lambda batch_rows, queued_rows: None)
        self._pending: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy_since: float | None = None  # when the forward pass now running started
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, rows: np.ndarray) -> np.ndarray:
        """Queue rows for the next batch and wait for their outputs (in order), at most `timeout_s`."""
        request = _Request(np.asarray(rows))
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed")
            problem = self.problem()
            if problem:  # Waiting behind a dead thread or a hung forward pass would only time out.
                raise ModelUnavailable(problem)
            if self._queued_rows + len(request.rows) > self.max_queue_rows and self._queued_rows:
                raise Overloaded(f"prediction queue is full ({self._queued_rows} images waiting), retry shortly")
            self._pending.append(request)
            self._queued_rows += len(request.rows)
            self._cond.notify()
        if not request.done.wait(self.timeout_s):
            self._abandon(request)
            raise PredictTimeout(f"no answer from {self.name} within {self.timeout_s:g} s (PREDICT_TIMEOUT_S)")
        if request.error is not None:
            raise request.error
        return request.result

    def _abandon(self, request: _Request) -> None:
        """Take a timed-out request out of the queue, so no forward pass is spent on it."""
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)
                self._queued_rows -= len(request.rows)

    def problem(self) -> str | None:
        """Why this batcher cannot answer now (its thread died, or one forward pass is hung), or None."""
        if not self._thread.is_alive() and not self._closed:
            return f"the batching thread {self.name} has stopped"
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.timeout_s:
            return (f"{self.name} has been in one forward pass for {time.monotonic() - busy_since:.0f} s, "
                    f"over PREDICT_TIMEOUT_S ({self.timeout_s:g} s)")
        return None

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

    def _outputs(self, batch: list[_Request]) -> np.ndarray:
        """Run the forward passes of one batch (an oversized request is split into max_batch_size pieces)."""
        rows = np.concatenate([r.rows for r in batch])
        self.on_batch(len(rows), self._queued_rows)
        outputs = np.concatenate([self.forward(rows[i:i + self.max_batch_size])
                                  for i in range(0, len(rows), self.max_batch_size)])
        if len(outputs) != len(rows):
            raise RuntimeError(f"{self.name}: the forward pass gave {len(outputs)} outputs for {len(rows)} rows")
        return outputs

    def _serve(self, batch: list[_Request]) -> None:
        """Answer every request of a batch: its outputs, or its own copy of the error."""
        self._busy_since = time.monotonic()
        try:
            outputs = self._outputs(batch)
        except BaseException as exc:
            logger.warning("%s: a batch of %d request(s) failed: %s: %s", self.name, len(batch),
                           type(exc).__name__, exc)
            for request in batch:
                request.error = own_copy(exc)
                request.done.set()
            return
        finally:
            self._busy_since = None
        start = 0
        for request in batch:
            request.result = outputs[start:start + len(request.rows)]
            start += len(request.rows)
            request.done.set()

    def _run(self) -> None:
        while True:
            batch: list[_Request] = []
            try:
                batch = self._take_batch()
                if batch is None:
                    return
                self._serve(batch)
            except BaseException as exc:  # The loop must outlive anything: a dead thread strands every caller.
                logger.exception("%s: unexpected error in the batching loop", self.name)
                for request in batch or []:
                    if not request.done.is_set():
                        request.error = own_copy(exc)
                        request.done.set()
                time.sleep(0.01)  # should the error repeat, do not spin

    def close(self) -> None:
        """Finish queued work and stop the thread; later submits raise BatcherClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.timeout_s)
