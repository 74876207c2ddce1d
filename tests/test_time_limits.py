"""Hard time limits: which child is killed, when, and what is remembered about it (fake pool and children)."""

from __future__ import annotations

import collections

import pytest

from engine import Engine
from engine.core import encode_message
from engine.request import Request
from engine.worker.limits import TimeLimits
from engine.worker.scheduler import QueuedTask


class TimeoutRecorder(Request):
    """Remembers the ``on_timeout`` calls the supervisor made."""

    calls: list = []

    def on_timeout(self, soft, timeout):
        TimeoutRecorder.calls.append((self.id, soft, timeout))


class BrokenTimeoutHandler(Request):
    def on_timeout(self, soft, timeout):
        raise RuntimeError("handler bug")


class FakePool:
    """Records the children it was asked to kill."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def kill(self, child):
        self.killed.append(child.pid)


class FakeChild:
    def __init__(self, pid: int, *entries: QueuedTask) -> None:
        self.pid = pid
        self.outstanding = collections.deque(entries)


@pytest.fixture
def app():
    application = Engine("limits", backend="memory://")

    @application.task(name="plain", Request=TimeoutRecorder)
    def plain():
        return None

    @application.task(name="limited", time_limit=5.0, Request=TimeoutRecorder)
    def limited():
        return None

    @application.task(name="broken", Request=BrokenTimeoutHandler)
    def broken():
        return None

    TimeoutRecorder.calls = []
    yield application
    application.close()


def running(app, name: str, started: float, **options) -> QueuedTask:
    """A task its child started at ``started`` (monotonic)."""
    task = app.tasks[name]
    message = task.build_message(**options)
    entry = QueuedTask(message, encode_message(message), task)
    entry.started = started
    return entry


def test_a_task_past_the_workers_limit_gets_its_child_killed_once(app):
    pool = FakePool()
    limits = TimeLimits(pool, default_limit=2.0, hostname="w@host")
    entry = running(app, "plain", started=100.0)
    child = FakeChild(41, entry)

    limits.enforce(now=102.0, children=[child])  # at the limit, not past it
    assert pool.killed == []
    limits.enforce(now=102.5, children=[child])
    limits.enforce(now=103.0, children=[child])  # killed already, not yet reaped

    assert pool.killed == [41]
    assert TimeoutRecorder.calls == [(entry.message.id, False, 2.0)]
    assert limits.killing(41)
    assert limits.reason(41) == ("time_limit", 2.0)
    assert not limits.killing(41)  # the reason is read once, when the child's exit is handled
    assert limits.reason(41) is None


def test_the_calls_limit_beats_the_tasks_which_beats_the_workers(app):
    pool = FakePool()
    limits = TimeLimits(pool, default_limit=100.0, hostname="w@host")
    by_call = FakeChild(1, running(app, "limited", started=1.0, time_limit=1.0))
    by_task = FakeChild(2, running(app, "limited", started=1.0))
    by_worker = FakeChild(3, running(app, "plain", started=1.0))

    limits.enforce(now=4.0, children=[by_call, by_task, by_worker])
    assert pool.killed == [1]
    limits.enforce(now=7.0, children=[by_call, by_task, by_worker])
    assert pool.killed == [1, 2]
    limits.enforce(now=102.0, children=[by_call, by_task, by_worker])
    assert pool.killed == [1, 2, 3]
    assert [limits.reason(pid) for pid in (1, 2, 3)] == [("time_limit", 1.0), ("time_limit", 5.0),
                                                         ("time_limit", 100.0)]


def test_no_limit_means_no_kill(app):
    pool = FakePool()
    limits = TimeLimits(pool, default_limit=None, hostname="w@host")
    limits.enforce(now=1e9, children=[FakeChild(1, running(app, "plain", started=1.0))])
    assert pool.killed == []


def test_only_the_running_task_counts_and_only_once_started(app):
    pool = FakePool()
    limits = TimeLimits(pool, default_limit=1.0, hostname="w@host")
    not_started = FakeChild(1, running(app, "plain", started=0.0))  # handed over, not begun (0: not started)
    idle = FakeChild(2)
    # The head started lately; the task queued behind it has an old stamp but is not running.
    waiting_behind = FakeChild(3, running(app, "plain", started=50.0), running(app, "plain", started=1.0))

    limits.enforce(now=50.5, children=[not_started, idle, waiting_behind])

    assert pool.killed == []


def test_a_failing_on_timeout_handler_does_not_save_the_child(app, caplog):
    pool = FakePool()
    limits = TimeLimits(pool, default_limit=1.0, hostname="w@host")
    limits.enforce(now=10.0, children=[FakeChild(7, running(app, "broken", started=1.0))])
    assert pool.killed == [7]
    assert "on_timeout handler failed" in caplog.text
