"""``engine-worker --autoscale MAX,MIN``: more children under a backlog, fewer when idle (Celery's autoscaler).

Checked at every housekeeping pass: when every child is busy and tasks wait
(for a child, or queued in one behind its running task), the pool grows by
the backlog, up to ``MAX``; once there has been no backlog and some child
idle for ``worker_autoscale_keepalive`` seconds (Celery's keepalive, 30 by
default), it shrinks to the children busy then, down to ``MIN``. Unlike Celery's, which checks once
a second, a burst is seen within one housekeeping interval.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.worker.supervisor import Supervisor

__all__ = ("Autoscaler", "parse_autoscale")

logger = logging.getLogger("engine.worker")


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"MAX,MIN"`` (or ``"MAX"``: MIN 1) as ``(max, min)``; raises ValueError on a bad value."""
    parts = [part.strip() for part in value.split(",")]
    try:
        numbers = [int(part) for part in parts if part]
    except ValueError:
        raise ValueError(f"--autoscale takes MAX,MIN (whole numbers), got {value!r}") from None
    if len(numbers) == 1:
        numbers.append(1)
    if len(numbers) != 2 or min(numbers) < 1:
        raise ValueError(f"--autoscale takes MAX,MIN with 1 <= MIN <= MAX, got {value!r}")
    high, low = max(numbers), min(numbers)
    return high, low


class Autoscaler:
    """Resizes a supervisor's pool between ``low`` and ``high`` children from its backlog."""

    def __init__(self, supervisor: Supervisor, high: int, low: int, keepalive: float) -> None:
        self.supervisor = supervisor
        self.high = high
        self.low = low
        self.keepalive = keepalive
        #: When the pool last had a backlog or every child busy (monotonic).
        self._last_busy: float | None = None

    def backlog(self) -> int:
        """Tasks accepted and not started: waiting for a child or queued in one."""
        sup = self.supervisor
        busy = sup.pool.busy()
        return len(sup.scheduler) + max(0, sup.in_children - busy)

    def tick(self, now: float) -> None:
        """Grow or shrink the pool once, if the backlog says so."""
        sup = self.supervisor
        children = [child for child in sup.pool.children.values() if child.accepting]
        size = sup.pool.concurrency
        busy = sum(1 for child in children if child.outstanding)
        backlog = self.backlog()
        if self._last_busy is None or backlog or busy >= len(children):
            self._last_busy = now
        if backlog and busy >= len(children) and size < self.high:
            grown = sup.resize_pool(min(backlog, self.high - size))
            logger.info("autoscale: %d task(s) waiting, pool grown to %d", backlog, grown)
        elif size > self.low and now - self._last_busy >= self.keepalive:
            # As Celery: after a keepalive without a backlog, down to what is busy (at least MIN).
            target = max(self.low, busy)
            if target < size:
                shrunk = sup.resize_pool(target - size)
                logger.info("autoscale: idle for %.0fs, pool shrunk to %d", self.keepalive, shrunk)
