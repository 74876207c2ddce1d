"""Per-worker rate limits: the task option ``rate_limit`` ("100/s", "10/m", "2/h", or a number per second).

As in Celery, a limit applies per worker and per task name. A task over its
limit is not refused and does not spin: the supervisor reserves the next free
slot of its kind and holds the task in its timer heap until then (where ETA
tasks wait, journaled the same way), so tasks of other kinds go on meanwhile.
Slots are spaced evenly (``1/rate`` apart): a burst of N tasks of a kind
limited to R per second runs over N/R seconds, in the order they came.
"""

from __future__ import annotations

import re
import time

__all__ = ("RateLimiter", "parse_rate")

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([smh]))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(value: object) -> float | None:
    """Tasks per second of a ``rate_limit`` value (None or 0: no limit); raises ValueError on a bad one."""
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"rate_limit must be >= 0, got {value!r}")
        return float(value)
    match = _RATE.match(str(value))
    if match is None:
        raise ValueError(f"rate_limit takes Celery's syntax ('100/s', '10/m', '2/h' or a number), got {value!r}")
    rate = float(match.group(1)) / _PER[match.group(2)]
    return rate or None


class RateLimiter:
    """The next free slot of each rate-limited task name (unix time)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._rates: dict[str, float | None] = {}

    def rate_of(self, task: object) -> float | None:
        """Tasks per second allowed for ``task`` (its ``rate_limit``), None when unlimited; cached per name."""
        name = getattr(task, "name", "")
        if name not in self._rates:
            try:
                self._rates[name] = parse_rate(getattr(task, "rate_limit", None))
            except ValueError:
                self._rates[name] = None  # reported when the task was registered; unlimited here
        return self._rates[name]

    def reserve(self, name: str, rate: float, now: float | None = None) -> float:
        """Reserve the next slot of ``name`` at ``rate`` per second: when the task may start (unix time)."""
        now = time.time() if now is None else now
        slot = max(now, self._next.get(name, 0.0))
        self._next[name] = slot + 1.0 / rate
        return slot
