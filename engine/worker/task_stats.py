"""What a worker has done, for ``engine inspect stats`` and the metrics: counts, run times, waits.

Counters per outcome over the worker's life, and per task name the count by
final state with the mean and 95th percentile of the run time and of the wait
(received to started) over its last :data:`SAMPLES` runs.
"""

from __future__ import annotations

import collections
from typing import Any

from engine import states

__all__ = ("SAMPLES", "TaskStats")

#: Runs per task name whose run time and wait the percentiles are taken over.
SAMPLES = 512

#: The counter each final state a child reports adds to.
_COUNTER_OF = {states.SUCCESS: "succeeded", states.FAILURE: "failed", states.RETRY: "retried",
               states.REVOKED: "revoked", states.REJECTED: "rejected", states.IGNORED: "ignored"}


class _Kind:
    __slots__ = ("by_state", "runtimes", "waits")

    def __init__(self) -> None:
        self.by_state: collections.Counter[str] = collections.Counter()
        self.runtimes: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.waits: collections.deque[float] = collections.deque(maxlen=SAMPLES)


def _summary(samples: collections.deque[float]) -> dict[str, float]:
    if not samples:
        return {"mean": 0.0, "p95": 0.0}
    ordered = sorted(samples)
    return {"mean": round(sum(ordered) / len(ordered), 6),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 6)}


class TaskStats:
    """Counts and timings of the tasks a worker ran."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.by_name: dict[str, _Kind] = {}

    def finished(self, name: str, state: str, runtime: float, wait: float) -> None:
        """A task ran to ``state`` in ``runtime`` seconds after waiting ``wait`` seconds to start."""
        kind = self.by_name.get(name)
        if kind is None:
            kind = self.by_name[name] = _Kind()
        kind.by_state[state] += 1
        kind.runtimes.append(runtime)
        kind.waits.append(wait)
        self.counters["started"] += 1
        self.counters[_COUNTER_OF.get(state, "other")] += 1

    def count(self, counter: str, name: str | None = None, state: str | None = None, n: int = 1) -> None:
        """Count an outcome decided by the supervisor (a revoked or lost task), per name when given."""
        self.counters[counter] += n
        if name is not None and state is not None:
            kind = self.by_name.get(name)
            if kind is None:
                kind = self.by_name[name] = _Kind()
            kind.by_state[state] += n

    def snapshot(self) -> dict[str, Any]:
        """Counters and per task name figures, as plain data."""
        return {
            "counters": dict(self.counters),
            "tasks": {name: {"count": sum(kind.by_state.values()), "by_state": dict(kind.by_state),
                             "runtime_s": _summary(kind.runtimes), "wait_s": _summary(kind.waits)}
                      for name, kind in sorted(self.by_name.items())},
        }
