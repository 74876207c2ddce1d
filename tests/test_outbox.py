"""The client's outbox: messages waiting for credit, one FIFO per queue (no sockets, no thread)."""

from __future__ import annotations

import threading
import types

import pytest

from engine.core import Outbox, Pending
from tests.support import CORE_TWINS


def pending(queue: str, task_id: str, size: int = 10) -> Pending:
    return Pending(queue, task_id, b"x" * size)


def ids(items: list[Pending]) -> list[str]:
    return [p.id for p in items]


def test_each_queue_is_first_in_first_out_and_counted():
    outbox = Outbox()
    for task_id in ("a1", "a2", "a3"):
        outbox.append(pending("a", task_id))
    outbox.append(pending("b", "b1"))

    assert len(outbox) == 4
    assert outbox.queues() == ["a", "b"]
    assert outbox.has("a") and outbox.has("b") and not outbox.has("c")
    assert ids(outbox.take("a", 2, 1 << 20)) == ["a1", "a2"]
    assert ids(outbox.take("b", 10, 1 << 20)) == ["b1"]
    assert len(outbox) == 1
    assert outbox.queues() == ["a"]  # an emptied queue is not listed
    assert not outbox.has("b")


def test_put_back_returns_messages_to_the_front_in_their_order():
    outbox = Outbox()
    for task_id in ("1", "2", "3", "4"):
        outbox.append(pending("q", task_id))
    taken = outbox.take("q", 2, 1 << 20)
    outbox.append(pending("q", "5"))

    outbox.put_back(taken)

    assert len(outbox) == 5
    assert ids(outbox.take("q", 10, 1 << 20)) == ["1", "2", "3", "4", "5"]


def test_put_back_sorts_mixed_queues_into_their_own_fifos():
    outbox = Outbox()
    outbox.append(pending("a", "a3"))
    outbox.put_back([pending("a", "a1"), pending("b", "b1"), pending("a", "a2")])
    assert ids(outbox.take("a", 10, 1 << 20)) == ["a1", "a2", "a3"]
    assert ids(outbox.take("b", 10, 1 << 20)) == ["b1"]
    assert len(outbox) == 0


def test_take_stops_at_the_count():
    outbox = Outbox()
    for i in range(10):
        outbox.append(pending("q", str(i)))
    assert ids(outbox.take("q", 3, 1 << 20)) == ["0", "1", "2"]
    assert len(outbox) == 7


def test_take_stops_before_the_byte_bound():
    outbox = Outbox()
    for i in range(10):
        outbox.append(pending("q", str(i), size=92))  # 100 bytes each with the 8 counted per item
    assert ids(outbox.take("q", 100, 250)) == ["0", "1"]
    assert ids(outbox.take("q", 100, 300)) == ["2", "3", "4"]
    assert len(outbox) == 5


def test_take_always_takes_at_least_one_even_when_it_is_over_the_byte_bound():
    outbox = Outbox()
    outbox.append(pending("q", "huge", size=10_000))
    outbox.append(pending("q", "small"))
    assert ids(outbox.take("q", 100, 50)) == ["huge"]
    assert ids(outbox.take("q", 100, 50)) == ["small"]


def test_demand_counts_waiting_messages_per_non_empty_queue():
    outbox = Outbox()
    assert outbox.demand() == {}
    for i in range(3):
        outbox.append(pending("a", f"a{i}"))
    outbox.append(pending("b", "b0"))
    assert outbox.demand() == {"a": 3, "b": 1}
    outbox.take("b", 1, 1 << 20)
    assert outbox.demand() == {"a": 3}


@pytest.mark.parametrize("core", CORE_TWINS)
def test_senders_in_many_threads_and_a_taking_thread_lose_and_repeat_nothing(core):
    # queue_pending as delay() calls it, from four threads, while a fifth plays the producer's
    # I/O thread: takes under the lock and puts some back. (The compiled append takes no lock.)
    producer = types.SimpleNamespace(_outbox=core.Outbox(), _unacked={}, max_outbox=1 << 30,
                                     _mutex=threading.RLock(), _wake=lambda: None)
    per_thread, taken, done = 5000, [], threading.Event()

    def send(name: str) -> None:
        for i in range(per_thread):
            core.queue_pending(producer, core.Pending("q", f"{name}-{i}", b"x"))

    def take() -> None:
        while not done.is_set() or len(producer._outbox):
            with producer._mutex:
                items = producer._outbox.take("q", 100, 1 << 20) if producer._outbox.has("q") else []
            if len(items) > 50:
                with producer._mutex:
                    producer._outbox.put_back(items[50:])
                items = items[:50]
            taken.extend(p.id for p in items)

    taker = threading.Thread(target=take)
    taker.start()
    senders = [threading.Thread(target=send, args=(f"t{n}",)) for n in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(timeout=60)
    done.set()
    taker.join(timeout=60)
    assert not taker.is_alive()
    assert len(taken) == len(set(taken)) == 4 * per_thread and len(producer._outbox) == 0
    for n in range(4):  # each sender's messages in its order
        mine = [int(task_id.split("-")[1]) for task_id in taken if task_id.startswith(f"t{n}-")]
        assert mine == sorted(mine)


def test_a_queues_first_message_and_a_full_outbox_take_the_producers_lock(monkeypatch):
    import engine.core

    class CountingLock:
        def __init__(self):
            self.lock, self.taken = threading.RLock(), 0

        def __enter__(self):
            self.taken += 1
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    woken: list = []
    producer = types.SimpleNamespace(_outbox=engine.core.Outbox(), _unacked={}, max_outbox=3, _mutex=CountingLock(),
                                     _wake=lambda: woken.append(1), _wait_for_room=lambda: None)
    engine.core.queue_pending(producer, engine.core.Pending("q", "a", b"x"))
    first = producer._mutex.taken
    assert first == 1 and woken == [1]  # a new queue: under the lock, and the I/O thread woken
    engine.core.queue_pending(producer, engine.core.Pending("q", "b", b"x"))
    assert woken == [1]  # behind another of its queue: no wake-up
    locked_again = producer._mutex.taken - first
    engine.core.queue_pending(producer, engine.core.Pending("q", "c", b"x"))
    engine.core.queue_pending(producer, engine.core.Pending("q", "d", b"x"))  # the outbox is full (3): the lock
    assert producer._mutex.taken - first - locked_again >= 1
    if engine.core.IMPLEMENTATION == "cython":
        assert locked_again == 0  # an existing queue's append takes no lock
    assert [p.id for p in producer._outbox.take("q", 10, 1 << 20)] == ["a", "b", "c", "d"]
