"""Which waiting task goes to which child.

:class:`FifoScheduler` (the default) hands each child up to
``prefetch_multiplier`` tasks ahead, first come first served: the fastest
mode when tasks are alike. :class:`FairScheduler` (``--fair``) hands a task
only to an idle child, and among the waiting tasks prefers the kind that is
expected to finish soonest (shortest expected run time first, from a moving
average per task name), with three guards: a task's priority grows with its
wait (aging, so long tasks are never starved); while a faster kind waits a
slower kind may not hold every child; and while a short kind has been seen lately,
long kinds leave one child free for it (for a bounded time), so a short task
arriving just after a burst of long ones does not wait behind them. The
averages are saved in the worker's journal file and loaded at start, so a
restarted worker schedules well from its first task; a worker that has never
run a kind learns it from the first run (its first long task starts before it
is known to be long). Celery's ``-Ofair`` is strict FIFO over
idle children, so a short task queued behind long ones waits for them; here
it overtakes them, which is the Tasks guide's advice "route long and short
tasks to dedicated workers", done inside one worker.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

# A received task waiting for a child is a class of the compiled core (engine.core.QueuedTask).
from engine.core import QueuedTask, fold_runtimes, hand_out, push_named

__all__ = ("FairScheduler", "FifoScheduler", "QueuedTask", "RuntimeStats", "make_scheduler")

#: Weight of the newest run time in the per-name moving average.
EWMA_ALPHA = 0.2
#: About how many runs the average run time over all kinds (which sizes the credit window) spans.
OVERALL_RUNS = 1024
#: Most tasks one child holds ahead in the default mode (tiny tasks).
MAX_DEPTH = 512
#: Seconds of expected run time that one second of waiting makes up for.
AGING = 1.0
#: A kind is "long" when it runs at least this long and LONG_RATIO times longer than another kind.
LONG_MIN = 0.1
LONG_RATIO = 10.0
#: Seconds a task kind counts as "around" after its last arrival.
KIND_MEMORY = 10.0
#: While a short kind was received within this many seconds, long kinds leave one child free for it...
RESERVE_HORIZON = 0.1
#: ... for at most this long per long task.
RESERVE_HOLD = 1.0
#: While short kinds are around, a long task waits this long after arriving before it may start,
#: so that short tasks sent with it (still in flight) are not queued behind it.
LONG_DELAY = 0.05
#: Expected run time (seconds) a fair child is handed at once: tasks of measured kinds, picked by
#: the same rules, as many as fit. A task waits at most about this long behind others in its
#: child, and a pipe write and a wake-up are shared by many tiny tasks instead of paid by each.
#: On few cores the supervisor may not run for a scheduler time slice (a few ms): a child must
#: hold more than that, or it runs dry between batches (bench/RESULTS.md, "fair budget").
FAIR_BATCH_SECONDS = 0.005
#: ... and at most this many tasks (the default mode's bound per child), whatever the averages
#: say: a bad average cannot pile a backlog onto one child.
FAIR_BATCH_MAX = MAX_DEPTH


class RuntimeStats:
    """A moving average of run time per task name, and the mean over the last runs of all tasks."""

    def __init__(self) -> None:
        self.by_name: dict[str, float] = {}
        #: Average run time over about the last :data:`OVERALL_RUNS` runs (0 before the first).
        self.overall = 0.0
        self._runs = 0
        #: True when a run time was added since the owner last saved :attr:`by_name`.
        self.changed = False

    def add(self, name: str, runtime: float) -> None:
        """Fold one measured run time in."""
        previous = self.by_name.get(name)
        self.by_name[name] = runtime if previous is None else previous + EWMA_ALPHA * (runtime - previous)
        # A slow average (the plain mean of the first runs, then a weight of 1/OVERALL_RUNS), not
        # a fast-moving one: the credit window and the default mode's depth are sized from it, and
        # in a mix of tiny and slow kinds an average of the last few runs swings by orders of
        # magnitude at each slow run. One multiply-add: this runs once per task.
        self._runs += 1
        self.overall += (runtime - self.overall) / (self._runs if self._runs < OVERALL_RUNS else OVERALL_RUNS)
        self.changed = True

    def add_runs(self, name: str, runtimes: list[float]) -> None:
        """Fold measured run times of ``name`` in, oldest first (as :meth:`add` of each, in one call)."""
        if not runtimes:
            return
        average, overall, count = fold_runtimes(self.by_name.get(name, runtimes[0]), self.overall, self._runs,
                                                runtimes, EWMA_ALPHA, OVERALL_RUNS)
        self.by_name[name] = average
        self.overall, self._runs = overall, count
        self.changed = True

    def load(self, by_name: dict[str, float]) -> None:
        """Start from averages saved by an earlier run (a kind measured since keeps its newer figure)."""
        for name, seconds in by_name.items():
            if seconds >= 0:
                self.by_name.setdefault(name, float(seconds))

    def estimate(self, name: str) -> float:
        """Expected run time of ``name`` (0 while unknown: a new kind gets one try soon)."""
        return self.by_name.get(name, 0.0)


class FifoScheduler:
    """First come, first served, ``prefetch`` tasks ahead per child (more for tiny tasks).

    A child holds at least ``prefetch`` tasks, and as many as make about
    ``queue_seconds`` of work when tasks are tiny: for no-op tasks four in
    flight would mean one pipe write and one wake-up per task, while a few
    hundred cost no more latency than 50 ms of queued work.
    """

    fair = False

    def __init__(self, prefetch: int, stats: RuntimeStats | None = None, queue_seconds: float = 0.05) -> None:
        self.prefetch = self.per_child = max(1, int(prefetch))
        self.stats = stats or RuntimeStats()
        self.queue_seconds = queue_seconds
        self.waiting: collections.deque[QueuedTask] = collections.deque()

    def depth(self) -> int:
        """Tasks a child may hold now."""
        average = self.stats.overall
        if not average:
            return self.prefetch
        return max(self.prefetch, min(MAX_DEPTH, int(self.queue_seconds / average)))

    def __len__(self) -> int:
        return len(self.waiting)

    def push(self, entry: QueuedTask) -> None:
        """Queue a task behind the others."""
        self.waiting.append(entry)

    def push_many(self, entries: list[QueuedTask]) -> None:
        """Queue tasks behind the others, in their order (as :meth:`push` of each)."""
        self.waiting.extend(entries)

    def held_for_credit(self, window: int) -> int:
        """Waiting tasks that count against a credit window of ``window`` tasks: all of them here."""
        return len(self.waiting)

    def remove_if(self, predicate: Callable[[QueuedTask], bool]) -> list[QueuedTask]:
        """Take out (and return) the waiting tasks ``predicate`` picks, e.g. revoked ones."""
        taken = [entry for entry in self.waiting if predicate(entry)]
        if taken:
            self.waiting = collections.deque(entry for entry in self.waiting if not predicate(entry))
        return taken

    def entries(self) -> list[QueuedTask]:
        """Every waiting task (for inspection)."""
        return list(self.waiting)

    def push_front(self, entry: QueuedTask) -> None:
        """Queue a task ahead of the others (it was taken back from a child)."""
        self.waiting.appendleft(entry)

    def expect_kinds(self, names: Iterable[str]) -> None:
        """Kinds an earlier run received (only the fair mode makes use of this)."""

    def assign(self, children: Iterable[Any]) -> list[tuple[Any, QueuedTask]]:
        """Pair waiting tasks with children that have room, spreading them round-robin."""
        out: list[tuple[Any, QueuedTask]] = []
        waiting = self.waiting
        if not waiting:
            return out
        self.per_child = self.depth()
        open_children = [c for c in children if c.accepting and len(c.outstanding) < self.per_child]
        while waiting and open_children:
            for child in list(open_children):
                if not waiting:
                    break
                out.append((child, waiting.popleft()))
                child.outstanding.append(out[-1][1])
                if len(child.outstanding) >= self.per_child:
                    open_children.remove(child)
        return out


class FairScheduler(FifoScheduler):
    """Idle children only; shortest expected first, with aging, a per-kind cap and a reserved child."""

    fair = True

    def __init__(self, prefetch: int = 1, stats: RuntimeStats | None = None, queue_seconds: float = 0.05) -> None:
        # Children get one task at a time; ``prefetch`` still sizes what waits here (the window).
        super().__init__(prefetch, stats, queue_seconds)
        self.per_child = 1
        self.by_name: dict[str, collections.deque[QueuedTask]] = {}
        self.count = 0
        #: When each task kind was last received: which kinds are "around".
        self.seen: dict[str, float] = {}

    def __len__(self) -> int:
        return self.count

    def held_for_credit(self, window: int) -> int:
        """Waiting tasks that count against the credit window; a backlog of slow kinds counts less.

        Short tasks overtake slow ones here, so while a short kind is around a
        backlog of slow tasks (kinds that go alone) must not fill the window and
        keep the short ones from even arriving: up to ``window`` of them do not
        count. With no short kind around every task counts, as in the default mode.
        """
        estimate = self.stats.estimate
        now = time.monotonic()
        if not any(now - when <= KIND_MEMORY and 0.0 < estimate(name) <= FAIR_BATCH_SECONDS
                   for name, when in self.seen.items()):
            return self.count
        slow = sum(len(queue) for name, queue in self.by_name.items() if estimate(name) > FAIR_BATCH_SECONDS)
        return self.count - min(slow, window)

    def remove_if(self, predicate: Callable[[QueuedTask], bool]) -> list[QueuedTask]:
        taken: list[QueuedTask] = []
        for name, queue in list(self.by_name.items()):
            picked = [entry for entry in queue if predicate(entry)]
            if not picked:
                continue
            taken += picked
            kept = collections.deque(entry for entry in queue if not predicate(entry))
            if kept:
                self.by_name[name] = kept
            else:
                del self.by_name[name]
        self.count -= len(taken)
        return taken

    def entries(self) -> list[QueuedTask]:
        return [entry for queue in self.by_name.values() for entry in queue]

    def push(self, entry: QueuedTask) -> None:
        name = entry.message.task
        queue = self.by_name.get(name)
        if queue is None:  # not setdefault: that would build a deque per task to throw away
            queue = self.by_name[name] = collections.deque()
        queue.append(entry)
        self.count += 1
        self.seen[name] = entry.received

    def push_many(self, entries: list[QueuedTask]) -> None:
        """Queue tasks behind the others, in their order (as :meth:`push` of each, in one call)."""
        push_named(self.by_name, self.seen, entries, collections.deque)
        self.count += len(entries)

    def _short_arrived_within(self, now: float, horizon: float, long_name: str) -> bool:
        limit = self.stats.estimate(long_name) / LONG_RATIO
        return any(now - when <= horizon and self.stats.estimate(other) <= limit
                   for other, when in self.seen.items() if other != long_name)

    def is_long(self, name: str, now: float) -> bool:
        """True for a kind that runs far longer than another kind seen lately."""
        expected = self.stats.estimate(name)
        if expected < LONG_MIN:
            return False
        for other, when in list(self.seen.items()):
            if now - when > KIND_MEMORY:
                del self.seen[other]
            elif other != name and self.stats.estimate(other) * LONG_RATIO <= expected:
                return True
        return False

    def expect_kinds(self, names: Iterable[str]) -> None:
        """Count ``names`` as just seen: a restarted worker expects the mix it served before.

        Without this the first long task after a restart would start at once
        (no short kind "around" yet) and the short tasks sent right behind it
        would share one child. The cost, for ``KIND_MEMORY`` seconds after a
        start, is at most ``LONG_DELAY`` for a long task with no short one behind it.
        """
        now = time.monotonic()
        for name in names:
            self.seen.setdefault(name, now)

    def push_front(self, entry: QueuedTask) -> None:
        self.by_name.setdefault(entry.name, collections.deque()).appendleft(entry)
        self.count += 1

    def assign(self, children: Iterable[Any]) -> list[tuple[Any, QueuedTask]]:
        """Hand each idle child the best waiting task, then more of measured kinds up to the batch budget.

        The first task of a child is picked as before (shortest expected first,
        with aging, the per-kind cap and the reserved child). Then, while the
        child's batch is expected to run under :data:`FAIR_BATCH_SECONDS`,
        the next pick joins it if its kind is measured and short enough to
        fit: tiny tasks go out a few hundred at a time, a task of a kind not
        measured yet or a long one still goes alone. A child about to be idle
        (it holds less than half the budget of measured short work) gets the
        next batch of such work too, so it does not wait a round trip between
        batches; a long task or one of a kind not measured yet waits for an
        idle child instead.
        """
        out: list[tuple[Any, QueuedTask]] = []
        if not self.count:
            return out
        children = list(children)
        self.children_count = len(children)
        soon = FAIR_BATCH_SECONDS / 2
        now = time.monotonic()
        # About to be idle: little measured work left, and the running task has not overrun its
        # expected time (one that has may run long: nothing more goes behind it).
        idle = [c for c in children if c.accepting and (
            not c.outstanding or (c.queued_seconds <= soon and c.outstanding[0].started
                                  and now - c.outstanding[0].started <= c.outstanding[0].expected))]
        if not idle:
            return out
        idle.sort(key=lambda c: bool(c.outstanding))  # the idle ones first
        held: collections.Counter[str] = collections.Counter()
        running_for: dict[str, float] = {}
        for child in children:
            if child.outstanding:
                head = child.outstanding[0]
                held[head.name] += 1
                running_for[head.name] = max(running_for.get(head.name, 0.0), now - head.started)
        cap = max(1, len(children) - 1)
        long_running = sum(n for name, n in held.items() if self.is_long(name, now))
        measured = self.stats.by_name
        for child in idle:
            first = not child.outstanding
            budget = FAIR_BATCH_SECONDS - child.queued_seconds
            while self.count:
                # After the first task, only kinds that fit what is left of the budget compete:
                # otherwise an aged slow kind (which would go alone) ends the batch at one task.
                name = self._pick(now, held, running_for, cap, long_running, fits=None if first else budget)
                if name is None:
                    break
                expected = measured.get(name)
                if first:
                    held[name] += 1
                    if self.is_long(name, now):
                        long_running += 1
                    take = 1
                elif expected is None or expected > budget or self.is_long(name, now):
                    break  # it goes alone, to the next idle child (or this one once it is done)
                else:
                    take = int(budget / max(expected, 1e-9) + 1e-6)  # 1e-6: 2 ms / 20 us is 100, not 99
                take = min(take, FAIR_BATCH_MAX - len(child.outstanding))
                if take <= 0:
                    break
                queue = self.by_name[name]
                cost = FAIR_BATCH_SECONDS if expected is None else expected  # not measured: counts as long
                waiting = len(queue)
                try:
                    budget = hand_out(queue, child, min(take, waiting), cost, expected or 0.0, budget, out)
                finally:  # what it handed out, even should it raise
                    self.count -= waiting - len(queue)
                if not queue:
                    del self.by_name[name]
                first = False
                if expected is None or budget <= 0:
                    break
            if not self.count:
                break
        return out

    def _pick(self, now: float, held: collections.Counter, running_for: dict[str, float], cap: int,
              long_running: int, fits: float | None = None) -> str | None:
        """The kind whose head task goes next; with ``fits``, only measured kinds expected within it."""
        best_name = None
        best_key: tuple[float, float] | None = None
        several = len(self.by_name) > 1
        measured = self.stats.by_name
        for name, queue in self.by_name.items():
            if fits is not None:
                expected = measured.get(name)
                if expected is None or expected > fits or self.is_long(name, now):
                    continue
            if several and held[name] >= cap and any(
                    held[other] < cap and self.stats.estimate(other) < self.stats.estimate(name)
                    for other in self.by_name if other != name):
                continue  # a slower kind may not take the last child while a faster kind waits
            head = queue[0]
            if self.is_long(name, now):
                waited = now - head.received
                if waited < LONG_DELAY:
                    continue  # short tasks sent with it are still arriving: let them go first
                if long_running >= cap and cap < self.children_count and waited < RESERVE_HOLD \
                        and self._short_arrived_within(now, RESERVE_HORIZON, name):
                    continue  # keep one child for the short kinds seen lately (bounded wait)
            # A kind still running for longer than its average is at least that long.
            expected = max(self.stats.estimate(name), running_for.get(name, 0.0))
            key = (expected - AGING * (now - head.received), head.received)
            if best_key is None or key < best_key:
                best_name, best_key = name, key
        return best_name


def make_scheduler(fair: bool, prefetch: int, stats: RuntimeStats | None = None,
                   queue_seconds: float = 0.05) -> FifoScheduler:
    """Return the scheduler for ``--fair`` (True) or the default mode."""
    return (FairScheduler if fair else FifoScheduler)(prefetch, stats, queue_seconds)
