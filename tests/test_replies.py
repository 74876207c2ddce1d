"""rpc:// replies: the reply router sends each task's states to the client waiting for them.

The router works on a real :class:`Consumer` opened on no endpoint, whose peers
sit on a fake ROUTER socket (``tests.fakes.FakeSocket``): a client connected to
this worker, or another worker that forwarded a task here, is one routed peer.
"""

from __future__ import annotations

import select

import pytest

from engine import states
from engine.core import StateRecord, TaskMessage
from engine.transport import protocol
from engine.transport.consumer import Consumer
from engine.worker.replies import ReplyRouter
from tests.fakes import FakeSocket


@pytest.fixture
def consumer():
    consumer = Consumer(None, "worker-1", [], [], ["celery"], 1 << 20)
    consumer.router = FakeSocket()
    return consumer


@pytest.fixture
def router(consumer):
    replies = ReplyRouter(consumer)
    yield replies
    replies.close()


def connect(consumer, name: str):
    """A peer that spoke to this worker: a client, or a worker that forwarded tasks here."""
    peer = consumer.peers.for_frame(consumer.router, name.encode())
    peer.last_seen = 1.0
    return peer


def message(task_id: str, reply_to: str | None = "client-1", ignore_result: bool = False,
            parent_id: str | None = None) -> TaskMessage:
    return TaskMessage(task_id, "t.add", reply_to=reply_to, ignore_result=ignore_result, parent_id=parent_id)


def record(task_id: str, state: str, result: bytes = b"\xc0") -> StateRecord:
    return StateRecord(task_id, state, result, None, 1.0)


def results_sent(consumer) -> list[tuple[bytes, list[tuple[str, str, str | None]]]]:
    """``(routing id, [(task id, state, client id), ...])`` per results frame sent."""
    return [(route, [(r.task_id, r.state, client) for r, client in protocol.unpack_addressed_records(body)])
            for route, kind, body in consumer.router.sent if kind == protocol.RESULTS]


def test_only_tasks_whose_client_waits_get_a_route(consumer, router):
    link = connect(consumer, "client-1")
    router.remember(message("waited"), link)
    router.remember(message("no-reply", reply_to=None), link)
    router.remember(message("ignored", ignore_result=True), link)

    assert router.routes == {"waited": ("client-1", link)}


def test_a_task_sent_by_a_child_goes_back_the_way_its_parent_came(consumer, router):
    forwarder = connect(consumer, "worker-2")
    router.remember(message("parent"), forwarder)
    router.remember(message("step-2", parent_id="parent"), None)  # a chain step, from a child
    router.remember(message("orphan", reply_to="client-9"), None)

    assert router.routes["step-2"] == ("client-1", forwarder)
    assert router.routes["orphan"] == ("client-9", None)


def test_states_go_straight_to_a_connected_client_one_frame_each_and_final_ones_end_the_route(consumer, router):
    one, two = connect(consumer, "client-1"), connect(consumer, "client-2")
    router.remember(message("a"), one)
    router.remember(message("b"), one)
    router.remember(message("c", reply_to="client-2"), None)

    router.send([record("a", states.STARTED), record("b", states.SUCCESS), record("c", states.FAILURE),
                 record("unknown", states.SUCCESS)])

    # Straight to the client: five-field records (what every client version reads).
    assert results_sent(consumer) == [
        (b"client-1", [("a", states.STARTED, None), ("b", states.SUCCESS, None)]),
        (b"client-2", [("c", states.FAILURE, None)]),
    ]
    assert list(router.routes) == ["a"]  # STARTED is not final: a's result still has to go out
    assert two in consumer.peers


def test_a_record_keeps_its_encoded_result_traceback_and_timestamp(consumer, router):
    router.remember(message("a"), connect(consumer, "client-1"))
    router.send([StateRecord("a", states.FAILURE, b"\x92\xa1x\x01", "Traceback ...", 12.5)])
    [(_, _, body)] = consumer.router.sent
    [got] = protocol.unpack_records(body)
    assert (got.task_id, got.state, got.result, got.traceback, got.timestamp) == \
        ("a", states.FAILURE, b"\x92\xa1x\x01", "Traceback ...", 12.5)


def test_a_client_not_connected_here_is_reached_through_the_worker_that_forwarded_the_task(consumer, router):
    forwarder = connect(consumer, "worker-2")
    router.remember(message("a", reply_to="client-far"), forwarder)
    router.send([record("a", states.SUCCESS)])
    # The record names its client, so the forwarding worker can relay it.
    assert results_sent(consumer) == [(b"worker-2", [("a", states.SUCCESS, "client-far")])]


def test_a_gone_client_is_logged_and_its_route_still_dropped(consumer, router, caplog):
    link = connect(consumer, "client-1")
    router.remember(message("a"), link)
    consumer.peers.remove(link)  # went silent and was expired
    router.send([record("a", states.SUCCESS)])
    assert consumer.router.sent == []
    assert "could not return 1 result(s) to client client-1" in caplog.text
    assert len(router) == 0


def test_a_full_client_queue_is_logged(consumer, router, caplog):
    router.remember(message("a"), connect(consumer, "client-1"))
    consumer.router.refuse = True
    router.send([record("a", states.SUCCESS)])
    assert "could not return 1 result(s)" in caplog.text


def test_before_the_transport_is_open_nothing_is_sent(caplog):
    router = ReplyRouter()
    try:
        router.remember(message("a"), None)
        router.send([record("a", states.SUCCESS)])
    finally:
        router.close()
    assert "could not return" in caplog.text


def test_states_a_task_records_for_other_tasks_follow_its_route(consumer, router):
    link = connect(consumer, "client-1")
    router.remember(message("running"), link)
    router.remember(message("own", reply_to="client-2"), None)
    router.follow("chain-step-3", "running")  # a failing chain marks its later steps failed
    router.follow("own", "running")  # a task with its own route keeps it
    router.follow("x", "not-routed")

    assert router.routes["chain-step-3"] == ("client-1", link)
    assert router.routes["own"] == ("client-2", None)
    assert "x" not in router.routes


def test_results_from_another_worker_are_relayed_to_their_client(consumer, router, caplog):
    class FakeProducer:
        def __init__(self):
            self.handlers = []

        def add_result_handler(self, handler):
            self.handlers.append(handler)

    producer = FakeProducer()
    router.listen(producer)
    router.listen(producer)  # once per producer
    assert len(producer.handlers) == 1
    connect(consumer, "client-1")
    router.remember(message("routed"), None)

    # The producer's I/O thread hands over what the other worker sent back, and wakes the loop.
    producer.handlers[0](protocol.pack_records([record("named", states.SUCCESS)], "client-1"))
    producer.handlers[0](protocol.pack_records([record("routed", states.SUCCESS)]))  # no name: its route's
    producer.handlers[0](b"\xc1")
    assert select.select([router.wake_fd], [], [], 0)[0]

    assert router.relay() == 2

    assert "dropped a malformed results frame" in caplog.text

    assert results_sent(consumer) == [(b"client-1", [("named", states.SUCCESS, None)]),
                                      (b"client-1", [("routed", states.SUCCESS, None)])]
    assert not select.select([router.wake_fd], [], [], 0)[0]  # drained
    assert router.relay() == 0


def test_prune_drops_the_oldest_routes_beyond_the_bound(consumer):
    router = ReplyRouter(consumer, max_routes=3)
    try:
        for i in range(5):
            router.remember(message(f"t{i}"), None)
        assert router.prune() == 2
        assert list(router.routes) == ["t2", "t3", "t4"]
        assert router.prune() == 0
    finally:
        router.close()
