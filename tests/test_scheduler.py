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
