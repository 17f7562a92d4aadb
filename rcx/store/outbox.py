"""A run's writes to its tracking store, sent in order by one background thread and retried
until the store answers, so that a lost tracking server never slows training.

:class:`~rcx.store.tracking.MlflowTracker` puts every write of a running run here (a step's
metrics, an artifact, the final status) and returns at once::

    outbox = Outbox(is_transient=...)
    outbox.put(Operation("metrics of step 3", send, step=3, size=40))   # never blocks
    drained = outbox.flush(timeout_s=30)       # at the end of the run: bounded wait
    outbox.close()                             # stop retrying (the thread is a daemon)

Decisions:

* **Why not MLflow's own asynchronous logging** (``log_batch(..., synchronous=False)``): its
  queue (``mlflow.utils.async_logging``) is unbounded, sends batches from a pool of 10 threads
  (no order), drops a batch whose HTTP retries fail (one ``ERROR`` log line per batch, nothing
  retried when the server returns), and its exit hook waits for the pool without a time limit.
* **Order**: one thread sends the oldest operation first; an operation leaves the queue only
  when it was written or rejected, so the final status is written after every metric before it.
* **Retry**: a failure that a later attempt can fix (:func:`is_transient`: no connection, a
  timeout, HTTP 5xx / 408 / 429) is retried after :data:`RETRY_DELAYS_S` (the last repeats)
  until it succeeds or the outbox is closed. Any other failure (HTTP 4xx: the store refused the
  request itself, a missing local file, a bug) rejects that operation, is recorded, and the next
  one is sent.
* **Bounded memory**: at most :data:`MAX_QUEUED_ITEMS` metric values (about 300 bytes each)
  wait at once; a step's metrics that do not fit are dropped and counted, never blocking the
  caller. ``put(..., essential=True)`` (the final status) is always accepted.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Metric values held while the store does not answer (~60 MB at most).
MAX_QUEUED_ITEMS = 200_000
#: Seconds between attempts at an operation that failed transiently; the last one repeats.
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
#: HTTP statuses that say "try again later".
TRANSIENT_HTTP_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Operation:
    """One write: ``send()`` performs it (raising on failure); ``step`` is the training step whose
    metrics it writes (None for other writes); ``size`` counts against the memory bound."""

    what: str
    send: Callable[[], object]
    step: int | None = None
    size: int = 1


@dataclass(frozen=True)
class Rejection:
    """An operation the store refused for good, and why."""

    operation: Operation
    error: Exception


def is_transient(exc: BaseException) -> bool:
    """True when a later attempt may succeed: the store was not reached, timed out, or answered
    HTTP 5xx / 408 / 429. MLflow reports a failed connection as an ``MlflowException`` with
    status 500 (``INTERNAL_ERROR``); its artifact uploads raise ``requests`` exceptions. A
    failure that carries its own verdict (``transient``: a call made in the MLflow tracking
    process, :mod:`rcx.store.tracking_process`) keeps it. Imports MLflow and ``requests`` only
    when ``exc`` comes from them (the training process has neither loaded)."""
    verdict = getattr(exc, "transient", None)
    if isinstance(verdict, bool):
        return verdict
    origin = type(exc).__module__.partition(".")[0]
    if origin == "mlflow":
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            return _transient_status(exc.get_http_status_code())
    if origin == "requests":
        import requests

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return _transient_status(exc.response.status_code)
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
    return isinstance(exc, ConnectionError)


def _transient_status(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_HTTP_STATUSES


class Outbox:
    """A bounded, ordered queue of :class:`Operation` sent by one daemon thread (started by the
    first :meth:`put`). Public state, read by the owner between calls:

    * ``failure``: the last transient error while the store does not answer, None once it does.
    * ``last_written_step``: the highest ``step`` written so far (None before the first).
    * ``rejected``: operations refused for good; ``dropped``: how many were refused by the
      bound (or after :meth:`close`), ``first_dropped``: the first of them (its ``what``).
    """

    def __init__(
        self,
        *,
        is_transient: Callable[[BaseException], bool] = is_transient,
        max_items: int = MAX_QUEUED_ITEMS,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    ) -> None:
        self._is_transient = is_transient
        self._max_items = max_items
        self._retry_delays_s = tuple(retry_delays_s) or (1.0,)
        self._queue: deque[Operation] = deque()
        self._queued_items = 0
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._head_since: float | None = None  # when the oldest operation was first tried
        self.failure: BaseException | None = None
        self.last_written_step: int | None = None
        self.rejected: list[Rejection] = []
        self.dropped = 0
        self.first_dropped: str | None = None

    def put(self, operation: Operation, *, essential: bool = False) -> bool:
        """Queue ``operation`` without waiting; False (it is counted in ``dropped`` and not kept)
        when the queue is full or closed. ``essential`` operations ignore the bound."""
        with self._changed:
            full = self._queued_items + operation.size > self._max_items
            if self._closed or (full and not essential):
                self.dropped += 1
                self.first_dropped = self.first_dropped or operation.what
                return False
            self._queue.append(operation)
            self._queued_items += operation.size
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rcx-outbox", daemon=True)
                self._thread.start()
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued operation to be written or rejected; True
        when the queue is empty."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue, timeout=timeout_s)

    def close(self) -> list[Operation]:
        """Stop sending (an attempt in progress finishes in the background) and return the
        operations that were never written, oldest first. Idempotent."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            return list(self._queue)

    def stalled_s(self) -> float:
        """Seconds since the oldest waiting operation was first tried (0 when none waits): a store
        that hangs rather than refuses shows here before its first error."""
        with self._changed:
            if not self._queue or self._head_since is None:
                return 0.0
            return time.monotonic() - self._head_since

    def pending(self) -> int:
        """How many operations wait (the one being sent included)."""
        with self._changed:
            return len(self._queue)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        attempts = 0
        while (operation := self._next()) is not None:
            try:
                operation.send()
            except Exception as exc:  # noqa: BLE001 - sorted into retry or rejection below
                if self._is_transient(exc):
                    attempts += 1
                    self._note_failure(exc)
                    self._pause(self._retry_delays_s[min(attempts, len(self._retry_delays_s)) - 1])
                    continue
                self._done(operation, Rejection(operation, exc))
            else:
                self._done(operation, None)
            attempts = 0

    def _next(self) -> Operation | None:
        """The oldest operation (left in the queue until done), or None once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                return None
            if self._head_since is None:
                self._head_since = time.monotonic()
            return self._queue[0]

    def _note_failure(self, exc: BaseException) -> None:
        with self._changed:
            self.failure = exc

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` before the next attempt; :meth:`close` ends the sleep."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed, timeout=seconds)

    def _done(self, operation: Operation, rejection: Rejection | None) -> None:
        with self._changed:
            if self._queue and self._queue[0] is operation:
                self._queue.popleft()
                self._queued_items -= operation.size
                self._head_since = None
            if rejection is not None:
                self.rejected.append(rejection)
            else:
                self.failure = None
                if operation.step is not None:
                    self.last_written_step = max(self.last_written_step or 0, operation.step)
            self._changed.notify_all()
