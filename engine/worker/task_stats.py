"""What a worker has done, for ``engine inspect stats`` and the metrics: counts, run times, waits.

Counters per outcome over the worker's life, and per task name the count by
final state with the mean and 95th percentile of the run time and of the wait
(received to started) over its last :data:`SAMPLES` runs.
"""

from __future__ import annotations

import bisect
import collections
from typing import Any

from engine import states
from engine.core import count_runs

__all__ = ("BUCKETS", "SAMPLES", "TaskStats")

#: Runs per task name whose run time and wait the percentiles are taken over.
SAMPLES = 512

#: The counter each final state a child reports adds to.
_COUNTER_OF = {states.SUCCESS: "succeeded", states.FAILURE: "failed", states.RETRY: "retried",
               states.REVOKED: "revoked", states.REJECTED: "rejected", states.IGNORED: "ignored"}


#: Upper bounds (seconds) of the run-time histogram's buckets (Prometheus's defaults, and three for tiny tasks).
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Kind:
    __slots__ = ("by_state", "histogram", "runs", "runtime_sum", "runtimes", "waits")

    def __init__(self) -> None:
        #: Final states, of runs and of tasks the supervisor decided (revoked before they started).
        self.by_state: dict[str, int] = {}
        #: Tasks of this name a child ran.
        self.runs = 0
        self.runtimes: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.waits: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        #: Runs per bucket of BUCKETS (not cumulative), the last one past the largest bound.
        self.histogram = [0] * (len(BUCKETS) + 1)
        self.runtime_sum = 0.0


def _summary(samples: collections.deque[float]) -> dict[str, float]:
    if not samples:
        return {"mean": 0.0, "p95": 0.0}
    ordered = sorted(samples)
    return {"mean": round(sum(ordered) / len(ordered), 6),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 6)}


class TaskStats:
    """Counts and timings of the tasks a worker ran (kept per name; totals are summed when asked)."""

    def __init__(self) -> None:
        self.by_name: dict[str, _Kind] = {}

    def _kind(self, name: str) -> _Kind:
        kind = self.by_name.get(name)
        if kind is None:
            kind = self.by_name[name] = _Kind()
        return kind

    def finished(self, name: str, state: str, runtime: float, wait: float) -> None:
        """A child ran a task to ``state`` in ``runtime`` seconds after it waited ``wait`` seconds to start."""
        # Once per task in the supervisor's loop: plain dict and list updates only.
        kind = self.by_name.get(name) or self._kind(name)
        by_state = kind.by_state
        by_state[state] = by_state.get(state, 0) + 1
        kind.runs += 1
        kind.runtimes.append(runtime)
        kind.waits.append(wait)
        kind.histogram[bisect.bisect_left(BUCKETS, runtime)] += 1
        kind.runtime_sum += runtime

    def finished_runs(self, name: str, run_states: list[str], runtimes: list[float], waits: list[float]) -> None:
        """Tasks of ``name`` ran (see :meth:`finished`): their states, run times and waits, in order."""
        kind = self.by_name.get(name) or self._kind(name)
        kind.runs += len(runtimes)
        kind.runtimes.extend(runtimes)
        kind.waits.extend(waits)
        count_runs(kind.by_state, kind.histogram, BUCKETS, run_states, runtimes)
        kind.runtime_sum += sum(runtimes)

    def decided(self, name: str, state: str) -> None:
        """A task ended in ``state`` without running (revoked before it started)."""
        by_state = self._kind(name).by_state
        by_state[state] = by_state.get(state, 0) + 1

    def counters(self) -> dict[str, int]:
        """Totals over every task name: started, succeeded, failed, retried, revoked, rejected, ignored."""
        totals = {"started": 0, "succeeded": 0, "failed": 0, "retried": 0, "revoked": 0, "rejected": 0, "ignored": 0}
        for kind in list(self.by_name.values()):
            totals["started"] += kind.runs
            for state, count in list(kind.by_state.items()):
                counter = _COUNTER_OF.get(state)
                if counter is not None:
                    totals[counter] += count
        return totals

    def mean_waits(self) -> dict[str, float]:
        """Per task name, the mean wait (received to started) over its last runs, in seconds."""
        return {name: _summary(kind.waits)["mean"] for name, kind in list(self.by_name.items()) if kind.waits}

    def snapshot(self) -> dict[str, Any]:
        """Counters and per task name figures, as plain data."""
        return {
            "counters": self.counters(),
            "tasks": {name: {"count": sum(kind.by_state.values()), "by_state": dict(kind.by_state),
                             "runtime_s": _summary(kind.runtimes), "wait_s": _summary(kind.waits)}
                      for name, kind in sorted(self.by_name.items())},
        }
