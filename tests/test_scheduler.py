"""The fair scheduler's choices and the run times it keeps across restarts (no processes)."""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace

from engine.worker.journal import Journal
from engine.worker.scheduler import LONG_DELAY, FairScheduler, QueuedTask, RuntimeStats


class FakeChild:
    """What the scheduler reads of a pool child."""

    def __init__(self) -> None:
        self.accepting = True
        self.queued_seconds = 0.0
        self.outstanding: collections.deque = collections.deque()


def queued(name: str) -> QueuedTask:
    return QueuedTask(SimpleNamespace(task=name, id=name), b"", task=None)


def known_stats() -> RuntimeStats:
    stats = RuntimeStats()
    stats.load({"long": 2.0, "short": 0.01})
    return stats


def test_loaded_averages_do_not_replace_newer_measurements():
    stats = RuntimeStats()
    stats.add("short", 0.02)
    stats.load({"short": 5.0, "long": 2.0, "broken": -1.0})
    assert stats.estimate("short") == 0.02
    assert stats.estimate("long") == 2.0
    assert stats.estimate("broken") == 0.0  # a negative figure is not a run time
    assert stats.changed  # the measured one, not the loaded ones


def test_journal_keeps_run_times_across_reopening(tmp_path):
    path = str(tmp_path / "journal.db")
    journal = Journal(path)
    assert journal.runtimes() == {}
    journal.save_runtimes({"long": 2.0, "short": 0.01})
    journal.save_runtimes({"long": 1.5, "short": 0.01})  # replaces, not adds
    journal.close()
    reopened = Journal(path)
    try:
        assert reopened.runtimes() == {"long": 1.5, "short": 0.01}
    finally:
        reopened.close()


def test_restarted_scheduler_holds_a_first_long_task_for_short_ones():
    scheduler = FairScheduler(stats=known_stats())
    scheduler.expect_kinds(["long", "short"])
    children = [FakeChild(), FakeChild()]
    scheduler.push(queued("long"))
    assert scheduler.assign(children) == []  # short tasks sent with it may still be arriving
    for _ in range(3):
        scheduler.push(queued("short"))
    picked = [entry.name for _, entry in scheduler.assign(children)]
    assert picked == ["short", "short"]


def test_long_task_is_not_held_forever():
    scheduler = FairScheduler(stats=known_stats())
    scheduler.expect_kinds(["long", "short"])
    children = [FakeChild(), FakeChild()]
    scheduler.push(queued("long"))
    time.sleep(LONG_DELAY * 1.5)
    assert [entry.name for _, entry in scheduler.assign(children)] == ["long"]


def test_without_history_the_first_task_starts_at_once():
    # A worker that never ran these kinds cannot know the first one is long.
    scheduler = FairScheduler(stats=RuntimeStats())
    children = [FakeChild(), FakeChild()]
    scheduler.push(queued("long"))
    assert [entry.name for _, entry in scheduler.assign(children)] == ["long"]


def test_an_idle_child_gets_a_batch_of_measured_tiny_tasks_up_to_the_budget():
    from engine.worker.scheduler import FAIR_BATCH_SECONDS

    stats = RuntimeStats()
    stats.load({"tiny": FAIR_BATCH_SECONDS / 100, "new": 0.0})
    scheduler = FairScheduler(stats=stats)
    for _ in range(300):
        scheduler.push(queued("tiny"))
    child, other = FakeChild(), FakeChild()

    assigned = scheduler.assign([child, other])

    assert len(child.outstanding) == len(other.outstanding) == 100  # 100 x 1/100 of the budget each
    assert len(assigned) == 200 and len(scheduler) == 100
    assert abs(child.queued_seconds - FAIR_BATCH_SECONDS) < 1e-9


def test_a_kind_not_measured_yet_or_a_long_one_goes_alone_and_only_to_an_idle_child():
    from engine.worker.scheduler import FAIR_BATCH_SECONDS

    stats = RuntimeStats()
    stats.load({"tiny": FAIR_BATCH_SECONDS / 100, "long": 2.0})
    scheduler = FairScheduler(stats=stats)
    busy = FakeChild()
    running = queued("tiny")
    running.started, running.expected = time.monotonic(), 1.0  # running, within its expected time
    busy.outstanding.append(running)
    busy.queued_seconds = FAIR_BATCH_SECONDS / 100  # about to be idle: may take more tiny work
    scheduler.push(queued("tiny"))
    assert [entry.name for _, entry in scheduler.assign([busy])] == ["tiny"]  # more tiny work, no round trip

    scheduler.push(queued("unknown"))
    assert scheduler.assign([busy]) == []  # a kind not measured yet waits for an idle child
    idle = FakeChild()
    assert [entry.name for _, entry in scheduler.assign([busy, idle])] == ["unknown"]
    assert list(idle.outstanding)[0].name == "unknown" and len(idle.outstanding) == 1

    for _ in range(2):
        entry = queued("long")
        entry.received -= 1.0  # past LONG_DELAY: short tasks sent with it have arrived
        scheduler.push(entry)
    long_child = FakeChild()
    scheduler.assign([long_child])
    assert len(long_child.outstanding) == 1  # a long task never has another behind it in its child


def test_nothing_more_goes_behind_a_task_that_overran_its_expected_time():
    from engine.worker.scheduler import FAIR_BATCH_SECONDS

    stats = RuntimeStats()
    stats.load({"tiny": FAIR_BATCH_SECONDS / 100})
    scheduler = FairScheduler(stats=stats)
    busy = FakeChild()
    running = queued("tiny")
    running.started, running.expected = time.monotonic() - 1.0, FAIR_BATCH_SECONDS / 100  # far past it
    busy.outstanding.append(running)
    busy.queued_seconds = running.expected
    scheduler.push(queued("tiny"))
    assert scheduler.assign([busy]) == []


def test_a_batch_never_exceeds_its_count_bound_whatever_the_average_says():
    from engine.worker.scheduler import FAIR_BATCH_MAX

    stats = RuntimeStats()
    stats.load({"polluted": 1e-9})  # e.g. an average spoiled by tasks that never ran
    scheduler = FairScheduler(stats=stats)
    for _ in range(FAIR_BATCH_MAX * 3):
        scheduler.push(queued("polluted"))
    child = FakeChild()
    scheduler.assign([child])
    assert len(child.outstanding) == FAIR_BATCH_MAX


def test_an_aged_slower_kind_does_not_cut_a_tiny_batch_to_one_task():
    # The mixed workload: a 50 ms kind on one child, tiny tasks waiting. The slower kind's
    # head has waited longer (aging ranks it first), but it would go alone: the idle child
    # must still get a whole batch of tiny tasks, not one per round trip.
    from engine.worker.scheduler import FAIR_BATCH_SECONDS

    stats = RuntimeStats()
    stats.load({"tiny": FAIR_BATCH_SECONDS / 100, "medium": 0.05})
    scheduler = FairScheduler(stats=stats)
    busy, idle = FakeChild(), FakeChild()
    running = queued("medium")
    running.started, running.expected = time.monotonic(), 0.05
    busy.outstanding.append(running)
    busy.queued_seconds = 0.05
    for _ in range(3):
        entry = queued("medium")
        entry.received -= 1.0
        scheduler.push(entry)
    for _ in range(50):
        scheduler.push(queued("tiny"))

    scheduler.assign([busy, idle])

    names = [entry.name for entry in idle.outstanding]
    assert names[0] == "tiny" and names.count("tiny") == 50  # cap: "medium" may not take the last child
    assert len(scheduler) == 3


def test_the_overall_mean_is_steady_in_a_mix_of_tiny_and_slow_runs():
    # It sizes the credit window: one slow run among many tiny ones must not shrink it tenfold.
    stats = RuntimeStats()
    for i in range(2000):
        stats.add("slow" if i % 100 == 50 else "tiny", 0.05 if i % 100 == 50 else 0.00003)
    before = stats.overall
    stats.add("slow", 0.05)
    assert 0.0003 < before < 0.001 and stats.overall < before * 1.2


def test_a_backlog_of_slow_tasks_does_not_fill_the_credit_window_while_short_tasks_flow():
    from engine.worker.scheduler import FAIR_BATCH_SECONDS

    stats = RuntimeStats()
    stats.load({"tiny": FAIR_BATCH_SECONDS / 100, "medium": 0.05})
    scheduler = FairScheduler(stats=stats)
    for _ in range(150):
        scheduler.push(queued("medium"))
    # No short kind around: every waiting task counts (no hoarding of slow work).
    assert scheduler.held_for_credit(window=100) == 150
    for _ in range(30):
        scheduler.push(queued("tiny"))
    # A short kind flows: up to a window's worth of the slow backlog does not count.
    assert scheduler.held_for_credit(window=100) == 30 + 50
    assert scheduler.held_for_credit(window=1000) == 30


def test_run_times_added_as_a_run_are_folded_in_as_one_by_one():
    one_by_one, as_runs = RuntimeStats(), RuntimeStats()
    samples = [("a", 0.5), ("a", 0.25), ("b", 2.0), ("a", 0.125), ("b", 1.0)]
    for name, runtime in samples:
        one_by_one.add(name, runtime)
    as_runs.add_runs("a", [0.5, 0.25])
    as_runs.add_runs("b", [])
    as_runs.add_runs("b", [2.0])
    as_runs.add_runs("a", [0.125])
    as_runs.add_runs("b", [1.0])
    assert as_runs.by_name == one_by_one.by_name and as_runs.changed
    assert as_runs.overall == one_by_one.overall


def test_task_figures_added_as_a_run_are_those_of_one_by_one():
    from engine.worker.task_stats import TaskStats

    one_by_one, as_runs = TaskStats(), TaskStats()
    runs = [("SUCCESS", 0.0002, 0.5), ("FAILURE", 0.03, 0.0), ("SUCCESS", 3.0, 1.5)]
    for state, runtime, wait in runs:
        one_by_one.finished("t", state, runtime, wait)
    as_runs.finished_runs("t", *map(list, zip(*runs)))
    assert as_runs.snapshot() == one_by_one.snapshot()
    assert as_runs.by_name["t"].histogram == one_by_one.by_name["t"].histogram
    assert as_runs.by_name["t"].runtime_sum == one_by_one.by_name["t"].runtime_sum


def test_tasks_pushed_together_wait_as_if_pushed_one_by_one():
    from engine.worker.scheduler import make_scheduler

    for fair in (False, True):
        one_by_one, together = make_scheduler(fair, 4), make_scheduler(fair, 4)
        entries = [queued(name) for name in ("a", "b", "a", "c", "a")]
        for entry in entries[:2]:
            one_by_one.push(entry)
            together.push(entry)
        for entry in entries[2:]:
            one_by_one.push(entry)
        together.push_many(entries[2:])
        together.push_many([])
        assert len(together) == len(one_by_one) == 5
        if fair:
            assert {n: list(q) for n, q in together.by_name.items()} == \
                {n: list(q) for n, q in one_by_one.by_name.items()}
            assert together.seen == one_by_one.seen
        else:
            assert list(together.waiting) == list(one_by_one.waiting) == entries
