"""The interface every result backend implements, and the disabled backend."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from engine import states
from engine.core import StateRecord
from engine.exceptions import ResultsDisabledError, TimeoutError
from engine.serialization import dumps, loads

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("Backend", "DisabledBackend")

#: First and largest sleep between two polls of ``wait_for`` (seconds).
POLL_FIRST = 0.0002
POLL_MAX = 0.5


class Backend:
    """Stores the latest StateRecord per task id.

    Writers call :meth:`store` with batches of *encoded* records (``result``
    is the bytes of :func:`engine.serialization.dumps`, as the worker's
    recorder holds them); readers call :meth:`get` (decoded records),
    :meth:`wait_for` and :meth:`forget`. Subclasses implement ``store``,
    ``get_encoded`` and ``forget``.
    """

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        self.url = url
        self.app = app
        self.accept_pickle = bool(app.conf.accept_pickle) if app is not None else False

    def store(self, records: Iterable[StateRecord]) -> None:
        """Store a batch of encoded records, keeping one final state per task id."""
        raise NotImplementedError

    def get_encoded(self, task_id: str) -> StateRecord | None:
        """Return the stored record of ``task_id`` with its result still encoded, or None."""
        raise NotImplementedError

    def forget(self, task_id: str) -> None:
        """Remove what is stored for ``task_id``."""
        raise NotImplementedError

    def get(self, task_id: str) -> StateRecord | None:
        """Return the stored record of ``task_id`` (result decoded), or None (PENDING)."""
        record = self.get_encoded(task_id)
        if record is None:
            return None
        result = record.result
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = loads(bytes(result), self.accept_pickle)
        return StateRecord(record.task_id, record.state, result, record.traceback, record.timestamp)

    def store_state(self, task_id: str, state: str, result: Any = None, traceback: str | None = None) -> None:
        """Store one state now (``update_state`` outside a worker-run call)."""
        self.store([StateRecord(task_id, state, dumps(result, self.accept_pickle), traceback, time.time())])

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = POLL_MAX
                 ) -> StateRecord:
        """Wait until ``task_id`` is ready and return its record (polling with backoff).

        Raises ``engine.exceptions.TimeoutError`` when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = POLL_FIRST
        while True:
            record = self.get(task_id)
            if record is not None and record.state in states.READY_STATES:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the result of task {task_id} was not ready within {timeout}s")
            pause = min(sleep, interval)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            sleep *= 1.5

    def close(self) -> None:
        """Release connections and files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url!r}>"


class DisabledBackend(Backend):
    """The backend of an app configured without one: every read says results are off."""

    def _disabled(self, *args: Any, **kwargs: Any) -> Any:
        raise ResultsDisabledError(
            "no result backend is configured: pass Engine(backend=...) (e.g. 'sqlite:///results.db') "
            "or set app.conf.result_backend to read task results")

    store = get = get_encoded = forget = wait_for = store_state = _disabled
