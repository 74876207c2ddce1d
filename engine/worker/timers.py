"""Tasks held until their time: countdown, ETA and retries with a delay.

The supervisor keeps them here, not in a child and not by sleeping, so a
worker holding thousands of future tasks costs one heap and no process. A
task leaves the heap for the scheduler once its time has come.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from itertools import count

from engine.worker.scheduler import QueuedTask

__all__ = ("TimerHeap",)


class TimerHeap:
    """Future tasks ordered by due time (a unix timestamp); ties keep their arrival order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, QueuedTask]] = []
        self._seq = count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, entry: QueuedTask) -> None:
        """Hold ``entry`` until ``due``."""
        heapq.heappush(self._heap, (due, next(self._seq), entry))

    def next_due(self) -> float | None:
        """When the earliest task is due, or None when nothing is held."""
        return self._heap[0][0] if self._heap else None

    def seconds_to_next(self, now: float | None = None) -> float | None:
        """Seconds until the earliest task is due (0 when overdue), or None when nothing is held."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - (time.time() if now is None else now))

    def any_due(self, now: float | None = None) -> bool:
        """True when a held task is due at ``now`` (default: the current time)."""
        return bool(self._heap) and self._heap[0][0] <= (time.time() if now is None else now)

    def remove_if(self, predicate: Callable[[QueuedTask], bool]) -> list[QueuedTask]:
        """Take out (and return) the held tasks ``predicate`` picks, e.g. revoked ones."""
        taken = [item[2] for item in self._heap if predicate(item[2])]
        if taken:
            self._heap = [item for item in self._heap if not predicate(item[2])]
            heapq.heapify(self._heap)
        return taken

    def entries(self) -> list[tuple[float, QueuedTask]]:
        """Every held task with when it is due, earliest first (for inspection)."""
        return [(due, entry) for due, _, entry in sorted(self._heap, key=lambda item: item[:2])]

    def pop_due(self, now: float | None = None) -> list[QueuedTask]:
        """Remove and return every task due at ``now``, earliest first."""
        heap = self._heap
        if not heap:
            return []
        now = time.time() if now is None else now
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        return due
