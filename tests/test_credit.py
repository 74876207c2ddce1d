"""Credit, both halves: the worker's :class:`Consumer` grants it, the client's :class:`Producer` spends it.

Most tests drive each half with fake sockets (:class:`FakeSocket` records what is
sent, replays queued frames and can refuse a send as a full ZeroMQ queue does),
so every step is one deterministic call. One test runs the worker's half over
real ZeroMQ (``inproc://``) to show the same frames work on real sockets.

The producer is built without its I/O thread (see the ``producer`` fixture): the
thread owns the sockets and loops on a poll, and the tests call the loop's steps
(``_receive``, ``_dispatch``, ``_heartbeat``) themselves instead.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from unittest import mock

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from engine.core import Outbox, Pending, TaskMessage, encode_batch, encode_message
from engine.transport import protocol
from engine.transport.consumer import ACTIVE_SECONDS, Consumer
from engine.transport.producer import BATCH_MAX, DEMAND_EVERY, Producer
from engine.transport.protocol import PEER_TIMEOUT, PeerTable
from tests.fakes import FakeSocket

# --- the worker's half -----------------------------------------------------------------


def consumer_with_clients(*names: str, queues=("q",)) -> tuple[Consumer, FakeSocket, list]:
    """A consumer whose ROUTER is a fake socket, with a routed peer per client name.

    No endpoints are given, so the constructor opens no socket (and uses no context).
    """
    consumer = Consumer(None, "worker-1", [], [], list(queues), 1 << 20)
    router = consumer.router = FakeSocket()
    consumer.sockets.append(router)
    peers = []
    for name in names:
        peer = consumer.peers.for_frame(router, name.encode())
        peer.last_seen = 1.0
        peers.append(peer)
    return consumer, router, peers


def credit_frames(router: FakeSocket) -> dict[bytes, list[dict]]:
    """CREDIT frames sent, per routing id."""
    out: dict[bytes, list[dict]] = {}
    for route, kind, body in router.sent:
        if kind == protocol.CREDIT:
            out.setdefault(route, []).append(protocol.unpack(body))
    return out


def report(consumer: Consumer, peer, waiting: dict, credit: dict | None = None) -> None:
    """The client behind ``peer`` sends a DEMAND frame: what it has waiting and what credit it holds."""
    peer.socket.inbox.append([peer.route, protocol.DEMAND, protocol.pack({"waiting": waiting, "credit": credit or {}})])
    assert list(consumer.receive(peer.socket)) == []


def send_tasks(consumer: Consumer, peer, count: int = 1, queue: str = "q") -> None:
    """The client behind ``peer`` sends ``count`` tasks of ``queue`` (counted as the supervisor does)."""
    messages = [TaskMessage(uuid.uuid4().hex, "t.add", (1, 2), queue=queue) for _ in range(count)]
    peer.socket.inbox.append([peer.route, protocol.TASKS, encode_batch(messages)])
    for received_from, _, raws in consumer.receive(peer.socket):
        Consumer.consumed(received_from, queue, len(raws))


def test_credit_goes_to_clients_with_tasks_waiting_and_idle_clients_get_none():
    consumer, router, (busy, idle) = consumer_with_clients("busy", "idle")
    report(consumer, busy, {"q": 5})
    report(consumer, idle, {})

    consumer.grant(100, standing=2)

    assert busy.credit == {"q": 5}
    assert idle.credit == {}
    assert credit_frames(router) == {b"busy": [{"q": 5}]}
    assert consumer.outstanding() == 5


def test_a_client_that_sent_tasks_lately_gets_standing_credit_for_its_next_lone_task():
    consumer, router, (active, idle) = consumer_with_clients("active", "idle")
    report(consumer, active, {"q": 1}, {"q": 1})
    send_tasks(consumer, active)
    report(consumer, idle, {})

    consumer.grant(100, standing=2)

    assert active.credit == {"q": 2}
    assert idle.credit == {}
    assert credit_frames(router) == {b"active": [{"q": 2}]}


def test_waiting_clients_share_what_is_free_round_robin_before_any_standing_credit():
    consumer, router, (first, second, active) = consumer_with_clients("first", "second", "active")
    send_tasks(consumer, active)  # active, nothing waiting: it would get standing credit if anything were left
    report(consumer, first, {"q": 50})
    report(consumer, second, {"q": 50})

    consumer.grant(3, standing=2)
    assert sorted([first.credit["q"], second.credit["q"]]) == [1, 2]  # neither locks the other out
    assert active.credit.get("q", 0) == 0
    ahead = first if first.credit["q"] == 2 else second

    report(consumer, first, {"q": 50})
    report(consumer, second, {"q": 50})
    consumer.grant(3, standing=2)
    # The first turn rotates: the client that got the larger share last time does not again.
    assert (first.credit["q"], second.credit["q"]) == ((1, 2) if ahead is first else (2, 1))


def test_credit_held_is_not_granted_again_and_new_demand_adds_the_difference():
    consumer, router, (client,) = consumer_with_clients("client")
    report(consumer, client, {"q": 3})
    consumer.grant(100, standing=1)
    consumer.grant(100, standing=1)
    assert credit_frames(router) == {b"client": [{"q": 3}]}

    report(consumer, client, {"q": 10}, {"q": 3})
    consumer.grant(100, standing=1)
    assert credit_frames(router)[b"client"][-1] == {"q": 7}
    assert client.credit == {"q": 10}


def test_tasks_received_count_against_what_the_client_reported_waiting():
    consumer, router, (client,) = consumer_with_clients("client")
    report(consumer, client, {"q": 4})
    consumer.grant(4, standing=0)
    send_tasks(consumer, client, 4)

    assert client.waiting == {"q": 0}
    consumer.grant(100, standing=0)
    assert credit_frames(router) == {b"client": [{"q": 4}]}  # the four it sent are not granted again


@given(free=st.integers(-5, 60), standing=st.integers(0, 4),
       clients=st.lists(st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 30)),
                                  st.booleans()), max_size=5))
def test_grants_never_exceed_what_is_free_nor_what_a_client_asked(free, standing, clients):
    consumer, router, peers = consumer_with_clients(*[f"c{i}" for i in range(len(clients))], queues=("a", "b"))
    for peer, (wants, active) in zip(peers, clients):
        if active:
            send_tasks(consumer, peer, queue="a")
        report(consumer, peer, wants)

    consumer.grant(free, standing)

    granted = sum(n for frames in credit_frames(router).values() for frame in frames for n in frame.values())
    assert granted == consumer.outstanding()
    assert 0 <= granted <= max(free, 0)
    for peer, (wants, active) in zip(peers, clients):
        assert set(peer.credit) <= {"a", "b"}  # only queues this worker consumes
        for queue, n in peer.credit.items():
            assert 0 <= n <= max(wants.get(queue, 0), standing if active else 0)


def test_a_late_client_gets_credit_while_a_hundred_idle_clients_hold_some():
    names = [f"idle-{i}" for i in range(100)]
    consumer, router, peers = consumer_with_clients(*names, "late")
    *idle, late = peers
    for peer in idle:  # each sent a task lately and holds standing credit
        report(consumer, peer, {}, {"q": 2})
    report(consumer, late, {"q": 1})

    consumer.grant(0, standing=2)  # the window is full: nothing is free
    assert consumer.outstanding() == 0  # what idle clients held is taken back for the waiting one
    assert all(frames == [{"q": -2}] for name, frames in credit_frames(router).items() if name != b"late")

    router.sent.clear()
    consumer.grant(1, standing=2)
    assert credit_frames(router) == {b"late": [{"q": 1}]}


def test_nothing_free_takes_back_credit_of_idle_clients_when_someone_waits():
    consumer, router, (waiting, idle) = consumer_with_clients("waiting", "idle")
    report(consumer, waiting, {"q": 3})
    report(consumer, idle, {}, {"q": 2})

    consumer.grant(0, standing=1)

    assert idle.credit == {"q": 0}
    assert credit_frames(router) == {b"idle": [{"q": -2}]}
    assert consumer.outstanding() == 0


def test_nothing_free_and_nobody_waiting_takes_nothing_back():
    consumer, router, (a, b) = consumer_with_clients("a", "b")
    report(consumer, a, {}, {"q": 2})
    report(consumer, b, {}, {"q": 1})

    consumer.grant(-3, standing=1)

    assert router.sent == []
    assert consumer.outstanding() == 3


def test_a_client_that_waits_keeps_its_credit_and_only_waited_for_queues_are_reclaimed():
    consumer, router, (busy, idle) = consumer_with_clients("busy", "idle", queues=("q", "r"))
    # A queue this worker does not consume counts for nothing.
    report(consumer, busy, {"q": 4, "elsewhere": 9}, {"q": 1})
    report(consumer, idle, {}, {"q": 2, "r": 5})

    consumer.grant(0, standing=1)

    assert busy.credit == {"q": 1}
    assert idle.credit == {"q": 0, "r": 5}
    assert credit_frames(router) == {b"idle": [{"q": -2}]}


def test_an_idle_clients_credit_is_taken_back_once_it_sent_nothing_for_a_while():
    consumer, router, (client,) = consumer_with_clients("client")
    report(consumer, client, {}, {"q": 2})
    send_tasks(consumer, client)
    sent_at = client.last_task

    consumer.reclaim_idle(sent_at + ACTIVE_SECONDS / 2)
    assert credit_frames(router) == {}
    consumer.reclaim_idle(sent_at + ACTIVE_SECONDS + 0.1)
    assert credit_frames(router) == {b"client": [{"q": -1}]}
    assert consumer.outstanding() == 0


def test_a_stopping_worker_grants_nothing():
    consumer, router, (client,) = consumer_with_clients("client")
    client.waiting = {"q": 3}
    consumer.stop_granting()
    consumer.grant(100, standing=2)
    assert router.sent == []


def test_consumed_counts_against_credit_and_never_below_zero():
    consumer, _, (client,) = consumer_with_clients("client", queues=("q", "r"))
    client.credit = {"q": 2}
    Consumer.consumed(client, "q")
    assert client.credit == {"q": 1}
    Consumer.consumed(client, "q", 5)
    Consumer.consumed(client, "r")  # sent without credit we know of
    assert client.credit == {"q": 0, "r": 0}


def test_consumed_any_takes_one_from_the_first_queue_with_credit():
    consumer, _, (client,) = consumer_with_clients("client", queues=("q", "r"))
    client.credit = {"q": 0, "r": 2}
    Consumer.consumed_any(client)
    assert client.credit == {"q": 0, "r": 1}
    client.credit = {}
    Consumer.consumed_any(client)  # nothing held: nothing to take
    assert client.credit == {}


def test_a_demand_frame_sets_credit_to_the_clients_own_count():
    consumer, router, (client,) = consumer_with_clients("client")
    client.credit = {"q": 9}  # what we think we granted; the client knows better
    router.inbox.append([b"client", protocol.DEMAND,
                         protocol.pack({"waiting": {"q": 4, "other": 2}, "credit": {"q": 3, "other": 7}})])

    assert list(consumer.receive(router)) == []

    assert client.credit == {"q": 3}  # only queues this worker consumes
    assert client.waiting == {"q": 4, "other": 2}


def test_a_hello_means_a_restarted_client_that_holds_no_credit():
    consumer, router, (client,) = consumer_with_clients("client")
    client.credit = {"q": 5}
    router.inbox.append([b"client", protocol.HELLO, protocol.pack({"role": "client", "id": "proc-42"})])

    list(consumer.receive(router))

    assert client.credit == {}
    assert client.name == "proc-42"


def test_a_new_client_becomes_a_peer_on_its_first_frame_and_task_batches_are_split():
    consumer, router, _ = consumer_with_clients()
    messages = [TaskMessage(f"id-{i}", "t.add", (i, i)) for i in range(3)]
    router.inbox.append([b"newcomer", protocol.TASKS, encode_batch(messages)])

    received = list(consumer.receive(router))

    peer = consumer.peers.get(b"newcomer")
    assert peer is not None and peer.last_seen > 0
    assert received == [(peer, encode_batch(messages), [encode_message(m) for m in messages])]


def test_malformed_and_unknown_frames_are_dropped_and_the_rest_still_read(caplog):
    consumer, router, (client,) = consumer_with_clients("client")
    router.inbox.extend([
        [b"client", protocol.DEMAND, b"\xc1"],                     # not msgpack
        [b"client", protocol.DEMAND, protocol.pack({"waiting": 1})],  # wrong shape
        [b"client", protocol.TASKS, b"\x91\xc4\x05hello"],          # not a batch of messages
        [b"client", b"X", b"??"],
        [b"only-one-part"],
        [b"client", protocol.DEMAND, protocol.pack({"waiting": {"q": 1}, "credit": {}})],
    ])

    batches = list(consumer.receive(router))

    assert [raws for _, _, raws in batches] == [[b"hello"]]  # split only; decoding comes later
    assert client.waiting == {"q": 1}
    assert "dropped" in caplog.text


def test_silent_clients_are_forgotten_with_their_credit_and_acks():
    consumer, router, (silent, alive) = consumer_with_clients("silent", "alive")
    report(consumer, silent, {}, {"q": 4})
    silent.last_seen = 100.0
    report(consumer, alive, {}, {"q": 1})
    alive.last_seen = 100.0 + PEER_TIMEOUT
    consumer.ack(silent, ["t1"])

    consumer.expire(100.0 + PEER_TIMEOUT + 1)

    assert silent not in consumer.peers
    assert alive in consumer.peers
    assert consumer.outstanding() == 1
    consumer.flush()
    assert router.sent == []  # the silent client's acks went with it


def test_a_connected_producer_is_never_expired():
    # Ventilator topology: the worker connected to the client; the link is the peer.
    consumer = Consumer(None, "worker-1", [], [], ["q"], 1 << 20)
    link = consumer.peers.connect(FakeSocket(), "inproc://client")
    link.last_seen = 1.0
    consumer.expire(1.0 + PEER_TIMEOUT * 10)
    assert link in consumer.peers


def test_acks_go_out_one_frame_per_client_and_heartbeats_to_all():
    consumer, router, (a, b) = consumer_with_clients("a", "b")
    for task_id in ("t1", "t2"):
        consumer.ack(a, [task_id])
    consumer.flush()
    consumer.flush()  # nothing new: nothing sent
    assert router.sent == [(b"a", protocol.ACKS, protocol.pack(["t1", "t2"]))]

    router.sent.clear()
    consumer.heartbeat()
    assert sorted(router.sent) == [(b"a", protocol.CREDIT, protocol.pack({})),
                                   (b"b", protocol.CREDIT, protocol.pack({}))]


@pytest.fixture
def over_zeromq():
    """A worker's Consumer bound on inproc and a client's DEALER ``client-1`` (not connected yet), closed after."""
    context = zmq.Context()
    endpoint = f"inproc://credit-{uuid.uuid4().hex}"
    consumer = Consumer(context, "worker-1", [endpoint], [], ["q"], 1 << 20)
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.ROUTING_ID, b"client-1")
    client.setsockopt(zmq.LINGER, 0)
    try:
        yield consumer, client, endpoint
    finally:
        client.close(linger=0)
        consumer.close()
        context.term()


def test_the_worker_half_over_real_zeromq(over_zeromq):
    consumer, client, endpoint = over_zeromq
    client.connect(endpoint)
    client.send_multipart([protocol.HELLO, protocol.pack({"role": "client", "id": "client-1"})])
    client.send_multipart([protocol.DEMAND, protocol.pack({"waiting": {"q": 3}, "credit": {}})])
    assert consumer.router.poll(2000)
    assert list(consumer.receive(consumer.router)) == []

    consumer.grant(10, standing=1)
    assert client.poll(2000)
    assert client.recv_multipart() == [protocol.CREDIT, protocol.pack({"q": 3})]

    message = TaskMessage("task-1", "t.add", (1, 2))
    client.send_multipart([protocol.TASKS, encode_batch([message])])
    assert consumer.router.poll(2000)
    [(peer, _, raws)] = list(consumer.receive(consumer.router))
    assert raws == [encode_message(message)]
    consumer.consumed(peer, "q")
    consumer.ack(peer, ["task-1"])
    consumer.flush()
    assert client.poll(2000)
    assert client.recv_multipart() == [protocol.ACKS, protocol.pack(["task-1"])]
    assert consumer.outstanding() == 2


def test_replayed_tasks_are_acknowledged_to_their_client_when_it_is_heard_again(over_zeromq):
    consumer, client, endpoint = over_zeromq
    consumer.acknowledge_when_heard({b"client-1": ["t1", "t2"], b"client-gone": ["t3"]})
    client.connect(endpoint)
    client.send_multipart([protocol.DEMAND, protocol.pack({"waiting": {}, "credit": {}})])
    assert consumer.router.poll(2000)
    list(consumer.receive(consumer.router))
    consumer.flush()
    assert client.poll(2000)
    assert client.recv_multipart() == [protocol.ACKS, protocol.pack(["t1", "t2"])]
    consumer.expire(time.monotonic() + 3600)  # a client never heard from: its tasks run here anyway
    assert consumer._unheard == {}


# --- the client's half -----------------------------------------------------------------


@pytest.fixture
def producer():
    """A Producer without its I/O thread: what ``_receive``, ``_dispatch`` and ``_heartbeat`` use.

    ``Producer.__init__`` starts the thread that owns the sockets and polls them;
    here the tests play that thread, one step at a time, with fake sockets, so no
    step depends on timing. (If the producer grows an attribute those steps use,
    it must be added here too.)
    """
    p = Producer.__new__(Producer)
    p._mutex = threading.RLock()
    p._lock = threading.Condition(p._mutex)
    p._outbox = Outbox()
    p._unacked = {}
    p._in_flight = 0
    p._peers = PeerTable()
    p._router = None
    p._result_handlers = []
    p._turn = 0
    p._demand_sent = 0.0
    p._demand_due = math.inf
    p._awake = False
    p._wake_r, p._wake_w = os.pipe()
    os.set_blocking(p._wake_r, False)
    os.set_blocking(p._wake_w, False)
    p.max_batch_bytes = 1 << 20
    p.ack_timeout = 10.0
    yield p
    os.close(p._wake_r)
    os.close(p._wake_w)


def worker_link(producer, name: str, credit: dict | None = None, last_seen: float = 1000.0):
    """A connected worker (a DEALER link on a fake socket) with ``credit`` granted."""
    sock = FakeSocket()
    peer = producer._peers.connect(sock, f"inproc://{name}")
    peer.credit = dict(credit or {})
    peer.last_seen = last_seen
    return peer, sock


def queue_messages(producer, queue: str, count: int, size: int = 10, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    for task_id in ids:
        producer._outbox.append(Pending(queue, task_id, task_id.encode().ljust(size, b".")))
    return ids


def sent_ids(sock: FakeSocket) -> list[list[str]]:
    """Task ids per TASKS frame sent on ``sock``."""
    return [[raw.rstrip(b".").decode() for raw in body] for body in sock.frames(protocol.TASKS)]


def test_credit_frames_add_up_and_negative_amounts_take_back(producer):
    peer, sock = worker_link(producer, "w1")
    sock.inbox.extend([[protocol.CREDIT, protocol.pack({"q": 2})], [protocol.CREDIT, protocol.pack({"q": 3, "r": 1})]])
    producer._receive(sock)
    assert peer.credit == {"q": 5, "r": 1}

    sock.inbox.extend([[protocol.CREDIT, protocol.pack({"q": -2})], [protocol.CREDIT, protocol.pack({"r": -10})]])
    producer._receive(sock)
    assert peer.credit == {"q": 3, "r": 0}  # never below zero


def test_acks_results_and_malformed_frames(producer):
    peer, sock = worker_link(producer, "w1", last_seen=0.0)
    queue_messages(producer, "q", 2)
    for p in producer._outbox.take("q", 2, 1 << 20):
        producer._unacked[p.id] = p
    results = []
    producer._result_handlers.append(results.append)
    sock.inbox.extend([
        [protocol.CREDIT, b"\xc1"],  # dropped, the rest still read
        [protocol.ACKS, protocol.pack(["m0", "unknown"])],
        [protocol.RESULTS, b"body"],
    ])

    producer._receive(sock)

    assert list(producer._unacked) == ["m1"]
    assert results == [b"body"]
    assert peer.last_seen > 0


def test_dispatch_sends_only_against_credit_and_keeps_messages_until_acknowledged(producer):
    rich, rich_sock = worker_link(producer, "rich", {"q": 3})
    broke, broke_sock = worker_link(producer, "broke", {})
    queue_messages(producer, "q", 5)

    producer._dispatch(now=2000.0)

    assert sent_ids(rich_sock) == [["m0", "m1", "m2"]]
    assert sent_ids(broke_sock) == []
    assert rich.credit == {"q": 0}
    assert set(producer._unacked) == {"m0", "m1", "m2"}
    assert all(p.peer is rich and p.sent_at == 2000.0 for p in producer._unacked.values())
    assert producer._outbox.demand() == {"q": 2}
    # Out of credit with messages waiting: every worker hears the demand at once ...
    for sock in (rich_sock, broke_sock):
        assert sock.frames(protocol.DEMAND) == [{"waiting": {"q": 2}, "credit": {}}]
    # ... after the tasks: a worker counts the tasks it receives against what was reported waiting.
    assert [frame[-2] for frame in rich_sock.sent] == [protocol.TASKS, protocol.DEMAND]


def test_a_flush_does_not_end_while_messages_are_being_sent(producer, monkeypatch):
    peer, sock = worker_link(producer, "w1", {"q": 5})
    queue_messages(producer, "q", 2)
    producer._thread = mock.Mock(is_alive=lambda: True)
    seen = []

    def send_multipart(frames, flags=0, copy=True):
        # Taken from the outbox, not yet acknowledged: neither queued nor unacknowledged.
        seen.append((producer.waiting, producer.flush(timeout=0)))

    monkeypatch.setattr(sock, "send_multipart", send_multipart)
    producer._dispatch(now=1.0)

    assert seen == [(2, False)]
    assert producer._in_flight == 0 and set(producer._unacked) == {"m0", "m1"}


def test_a_send_that_fails_with_an_error_puts_its_messages_back(producer, monkeypatch, caplog):
    peer, sock = worker_link(producer, "w1", {"q": 5})
    queue_messages(producer, "q", 3)

    def broken(value):
        raise RuntimeError("packing failed")

    monkeypatch.setattr(protocol, "pack", broken)
    producer._dispatch(now=1.0)

    assert producer._outbox.demand() == {"q": 3} and producer._unacked == {} and producer._in_flight == 0
    assert peer.credit == {"q": 0}  # no more sends to it until it grants again
    assert "sending 3 task(s) to" in caplog.text


def test_dispatch_goes_round_robin_over_workers_with_credit(producer):
    producer.max_batch_bytes = 250  # two 100-byte messages per frame
    a, a_sock = worker_link(producer, "a", {"q": 10})
    b, b_sock = worker_link(producer, "b", {"q": 10})
    queue_messages(producer, "q", 6, size=92)

    producer._dispatch(now=1.0)

    assert sent_ids(a_sock) == [["m0", "m1"], ["m4", "m5"]]
    assert sent_ids(b_sock) == [["m2", "m3"]]
    assert (a.credit, b.credit) == ({"q": 6}, {"q": 8})
    # The turn carries over: the next burst starts with the worker that was next.
    queue_messages(producer, "q", 2, size=92, prefix="n")
    producer._dispatch(now=2.0)
    assert sent_ids(b_sock)[-1] == ["n0", "n1"]


def test_dispatch_caps_a_frame_at_batch_max(producer):
    _, sock = worker_link(producer, "w", {"q": BATCH_MAX + 10})
    queue_messages(producer, "q", BATCH_MAX + 10, size=1)
    producer._dispatch(now=1.0)
    assert [len(ids) for ids in sent_ids(sock)] == [BATCH_MAX, 10]


def test_a_refused_send_puts_messages_back_zeroes_that_credit_and_wakes_the_thread(producer):
    full, full_sock = worker_link(producer, "full", {"q": 5})
    full_sock.refuse = True  # its ZeroMQ queue is full (zmq.Again), or it is gone
    other, other_sock = worker_link(producer, "other", {})
    queue_messages(producer, "q", 3)

    producer._dispatch(now=1.0)

    assert producer._unacked == {}
    assert full.credit == {"q": 0}
    assert [p.id for p in producer._outbox.take("q", 10, 1 << 20)] == ["m0", "m1", "m2"]  # in their order
    assert producer._awake
    assert os.read(producer._wake_r, 16) == b"x"

    # Then another worker's credit takes them, as the woken thread's next dispatch would.
    queue_messages(producer, "q", 3)
    other.credit = {"q": 3}
    producer._dispatch(now=2.0)
    assert sent_ids(other_sock) == [["m0", "m1", "m2"]]
    assert sent_ids(full_sock) == []


def test_unacknowledged_messages_of_a_silent_worker_go_back_to_the_front_of_the_outbox(producer):
    silent, silent_sock = worker_link(producer, "silent", {"q": 3}, last_seen=100.0)
    queue_messages(producer, "q", 3)
    producer._dispatch(now=100.0)
    queue_messages(producer, "q", 1, prefix="later")
    assert set(producer._unacked) == {"m0", "m1", "m2"}

    producer._heartbeat(now=100.0 + PEER_TIMEOUT + 0.1)

    assert producer._unacked == {}
    assert [p.id for p in producer._outbox.take("q", 10, 1 << 20)] == ["m0", "m1", "m2", "later0"]
    assert silent.credit == {}  # a silent worker's credit is not used either


def test_a_live_worker_that_never_acknowledges_gets_its_messages_taken_back(producer):
    worker, _ = worker_link(producer, "w", {"q": 2}, last_seen=100.0)
    queue_messages(producer, "q", 2)
    producer._dispatch(now=100.0)

    worker.last_seen = 104.0  # still heard from, within PEER_TIMEOUT
    producer._heartbeat(now=105.0)
    assert set(producer._unacked) == {"m0", "m1"}  # not yet: within the ack timeout

    worker.last_seen = 110.5
    producer._heartbeat(now=110.5)  # 10.5 s after sending, past ack_timeout (10 s)
    assert producer._unacked == {}
    assert producer._outbox.demand() == {"q": 2}


def test_the_demand_frame_reports_waiting_and_held_credit_and_the_worker_takes_it_as_truth(producer):
    # Both halves: what the client reports is what the worker then counts as granted to it.
    link, link_sock = worker_link(producer, "w", {"q": 2, "r": 0})
    queue_messages(producer, "q", 1)
    queue_messages(producer, "other", 4, prefix="o")
    producer._heartbeat(now=link.last_seen + 0.1)
    [frame] = link_sock.sent
    assert protocol.unpack(frame[1]) == {"waiting": {"q": 1, "other": 4}, "credit": {"q": 2}}

    consumer, router, (client,) = consumer_with_clients("client")
    client.credit = {"q": 40}
    router.inbox.append([b"client", *frame])
    list(consumer.receive(router))
    assert client.credit == {"q": 2}
    assert client.waiting == {"q": 1, "other": 4}


def test_a_demand_held_back_by_the_throttle_is_sent_when_it_is_due_not_at_the_next_heartbeat(producer):
    # A new client: its first demand (nothing waiting yet) went out as it linked; its first
    # burst, queued a moment later, wakes the I/O thread once. That demand must follow soon.
    link, sock = worker_link(producer, "w")
    producer._send_demand(1000.0, {})
    queue_messages(producer, "q", 5)
    producer._dispatch(1000.0 + DEMAND_EVERY / 2)
    assert len(sock.frames(protocol.DEMAND)) == 1  # held back: asked too recently
    assert producer._demand_due == 1000.0 + DEMAND_EVERY  # ... but the loop wakes for it
    producer._dispatch(producer._demand_due + 1e-6)
    demands = sock.frames(protocol.DEMAND)
    assert len(demands) == 2 and demands[-1]["waiting"] == {"q": 5}
    assert producer._demand_due == math.inf
    link.credit = {"q": 5}
    producer._dispatch(producer._demand_sent + 1.0)
    assert sent_ids(sock) == [["m0", "m1", "m2", "m3", "m4"]] and producer._demand_due == math.inf
