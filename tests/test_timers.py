"""The supervisor's timer heap: countdown, ETA and retry-delay tasks held until their time (no processes)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from engine.worker.scheduler import QueuedTask
from engine.worker.timers import TimerHeap


def entry(name: str) -> QueuedTask:
    return QueuedTask(SimpleNamespace(task=name, id=name), b"", task=None)


def names(entries: list[QueuedTask]) -> list[str]:
    return [e.name for e in entries]


def test_an_empty_heap_holds_nothing_and_has_no_due_time():
    heap = TimerHeap()
    assert len(heap) == 0
    assert not heap
    assert heap.next_due() is None
    assert heap.seconds_to_next(now=100.0) is None
    assert not heap.any_due(now=100.0)
    assert heap.pop_due(now=100.0) == []


def test_tasks_leave_earliest_first_and_only_once_due():
    heap = TimerHeap()
    heap.push(300.0, entry("c"))
    heap.push(100.0, entry("a"))
    heap.push(200.0, entry("b"))

    assert heap.next_due() == 100.0
    assert heap.pop_due(now=99.9) == []
    assert names(heap.pop_due(now=200.0)) == ["a", "b"]  # due exactly at ``now`` counts
    assert len(heap) == 1
    assert heap.next_due() == 300.0


def test_tasks_due_at_the_same_time_keep_their_arrival_order():
    heap = TimerHeap()
    for name in ("first", "second", "third"):
        heap.push(50.0, entry(name))
    assert names(heap.pop_due(now=50.0)) == ["first", "second", "third"]


def test_seconds_to_next_counts_down_and_is_zero_when_overdue():
    heap = TimerHeap()
    heap.push(100.0, entry("a"))
    assert heap.seconds_to_next(now=90.0) == 10.0
    assert heap.seconds_to_next(now=150.0) == 0.0
    assert not heap.any_due(now=99.0)
    assert heap.any_due(now=100.0)


def test_the_default_now_is_the_wall_clock():
    # ETAs are unix timestamps, so the heap compares with time.time(), not a monotonic clock.
    heap = TimerHeap()
    heap.push(time.time() - 1, entry("past"))
    heap.push(time.time() + 3600, entry("future"))
    assert heap.any_due()
    assert heap.seconds_to_next() == 0.0
    assert names(heap.pop_due()) == ["past"]
    assert not heap.any_due()
    assert 3500 < heap.seconds_to_next() <= 3600
