"""An in-process result backend (``memory://``) for tests and eager runs.

Results live in this process only; waiters are woken by a condition variable
instead of polling.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from engine import states
from engine.backends.base import Backend
from engine.core import StateRecord, StateRecorder
from engine.exceptions import TimeoutError

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("MemoryBackend",)


class MemoryBackend(Backend):
    """Keeps records in a core StateRecorder, so state precedence applies as in real backends."""

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        super().__init__(url, app)
        self._table = StateRecorder()
        self._changed = threading.Condition()

    def store(self, records: Iterable[StateRecord]) -> None:
        with self._changed:
            for record in records:
                self._table.record(record.task_id, record.state, record.result, record.traceback, record.timestamp)
            self._table.flush()
            self._changed.notify_all()

    def get_encoded(self, task_id: str) -> StateRecord | None:
        with self._changed:
            return self._table.get(task_id)

    def get_many_encoded(self, task_ids: Sequence[str]) -> dict[str, StateRecord]:
        with self._changed:
            table = self._table
            return {task_id: record for task_id in task_ids if (record := table.get(task_id)) is not None}

    def wait_for_many(self, task_ids: Sequence[str], timeout: float | None = None,
                      interval: float = 0.5,
                      on_ready: Callable[[int], None] | None = None) -> dict[str, StateRecord]:
        """Wait until every one of ``task_ids`` is ready, woken by each store (no polling).

        Each wake-up looks from the first id not ready yet onwards and stops at the
        next one not ready: results mostly arrive in order, so a wake-up costs what
        arrived, not a look at every id still waited for.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        ready: dict[str, StateRecord] = {}
        head = 0
        with self._changed:
            while True:
                table = self._table
                start = head
                while head < len(pending):
                    record = table.get(pending[head])
                    if record is None or record.state not in states.READY_STATES:
                        break
                    ready[pending[head]] = record
                    head += 1
                if on_ready is not None and head > start:
                    on_ready(head - start)
                if head == len(pending):
                    return self.decode_many(ready)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    missing = sum(1 for task_id in pending[head:] if (record := table.get(task_id)) is None
                                  or record.state not in states.READY_STATES)
                    raise TimeoutError(f"{missing} of {len(pending)} results were not ready "
                                       f"within {timeout}s (the first: task {pending[head]})")
                self._changed.wait(remaining)

    def forget(self, task_id: str) -> None:
        with self._changed:
            self._table.forget(task_id)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5) -> StateRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                record = self._table.get(task_id)
                if record is not None and record.state in states.READY_STATES:
                    return self.get(task_id)  # type: ignore[return-value]  # stored, and the lock is held: not None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the result of task {task_id} was not ready within {timeout}s")
                self._changed.wait(remaining)
