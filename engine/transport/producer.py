"""The client side of the transport: sends task messages to workers that have credit.

``app.send_message()`` hands an encoded message to the :class:`Producer` of
its process and returns at once (a plain ``delay()`` queues it in the
producer's outbox itself: ``engine.core.PlainSender``). A background I/O
thread owns the ZeroMQ sockets (they are not thread-safe); it packs waiting
messages into one frame per worker and queue, sends only as much as each
worker granted, and keeps every message until the worker acknowledged it.
When a worker goes silent its unacknowledged messages go back to the outbox
for another worker.

At exit (``atexit``, or ``app.close()``), :meth:`Producer.flush` waits until
every message was acknowledged, so a script that sends N tasks and exits at
once loses none, and tasks sent before any worker is up are delivered when
one starts. ``producer_flush_timeout`` bounds that wait.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import zmq

from engine.core import Outbox, Pending, decode_message, encode_message, queue_pending, split_batch
from engine.exceptions import EncodeError, ImproperlyConfigured, OutboxFull
from engine.transport import protocol
from engine.transport.discovery import EndpointSet
from engine.transport.protocol import PEER_TIMEOUT, Peer, PeerTable
from engine.utils import process
from engine.utils.hostname import HOSTNAME

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.core import TaskMessage

__all__ = ("Producer",)

logger = logging.getLogger("engine.producer")

#: Most messages packed into one frame.
BATCH_MAX = 512
#: Seconds between two demand/heartbeat frames to each worker.
HEARTBEAT = 0.25
#: Least seconds between two demand frames sent because credit ran out.
DEMAND_EVERY = 0.001
#: Seconds between two "still waiting" warnings during flush ...
FLUSH_WARN_EVERY = 5.0
#: ... and before the first: long enough that a reachable worker has taken everything by then.
FLUSH_WARN_FIRST = 0.25

_producers: weakref.WeakSet[Producer] = weakref.WeakSet()


class Producer:
    """One process's connection to the workers of an app."""

    def __init__(self, app: Engine) -> None:
        self.app = app
        self.pid = process.pid()
        self.client_id = f"client-{HOSTNAME}-{self.pid}-{uuid.uuid4().hex[:8]}"
        endpoints = app.conf.transport
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.bind = bool(app.conf.transport_bind)
        #: What the client links to: the endpoints, DNS names resolved (and resolved again).
        self._endpoint_set = EndpointSet(self.endpoints, self.client_id, app.conf.transport_max_peers,
                                         float(app.conf.transport_dns_refresh))
        if self.bind and self._endpoint_set.dynamic:
            raise ImproperlyConfigured("dns+tcp:// entries name workers to connect to: not with transport_bind=True")
        self._outbox = Outbox()
        self.max_message_size = int(app.conf.max_message_size)
        self.ack_timeout = float(app.conf.transport_ack_timeout)
        self.max_outbox = int(app.conf.producer_max_outbox)
        #: A frame carries at most half the receiving socket's limit, so it is never refused.
        self.max_batch_bytes = self.max_message_size // 2
        self._unacked: dict[str, Pending] = {}
        #: Messages the I/O thread took from the outbox and is sending (outside the lock): in
        #: neither the outbox nor ``_unacked`` until sent, yet not delivered.
        self._in_flight = 0
        # A send takes the lock itself (a Condition's ``with`` is a Python-level call), unless it
        # only appends to a queue's existing deque (engine.core.queue_pending); the condition
        # shares it, for waiting on acknowledgements and room. Reentrant: a finalizer or a
        # logging handler that sends a task may run while this thread holds it.
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._awake = False
        self._demand_sent = 0.0
        #: When a demand held back by DEMAND_EVERY is to be sent (the loop wakes for it); inf: none.
        self._demand_due = math.inf
        self._turn = 0
        self._closing = False
        self._result_handlers: list[Any] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-producer", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        _producers.add(self)

    # --- caller side ------------------------------------------------------------

    def usable(self) -> bool:
        """False after a fork (a child must make its own) or after close."""
        return self.pid == process.pid() and not self._closing

    def send(self, message: TaskMessage) -> None:
        """Queue one task message for sending; returns at once.

        A plain ``delay()`` packs its message itself (``engine.core.PlainSender``) and
        queues it the same way, through ``engine.core.queue_pending``.
        """
        raw = encode_message(message)
        if len(raw) > self.max_batch_bytes:
            raise EncodeError(f"task message {message.task}[{message.id}] is {len(raw)} bytes; max_message_size "
                              f"({self.max_message_size}) allows at most {self.max_batch_bytes} per message")
        queue_pending(self, Pending(message.queue, message.id, raw))

    def _wait_for_room(self) -> None:
        """Bounded memory: block until workers took some messages, or raise (``producer_outbox_full``)."""
        if self.app.conf.producer_outbox_full == "raise":
            raise OutboxFull(f"{self.max_outbox} messages are waiting for a worker (producer_max_outbox)")
        self._wake()
        while len(self._outbox) + len(self._unacked) >= self.max_outbox:
            if not self._thread.is_alive():
                raise OutboxFull("the producer's I/O thread stopped with its outbox full")
            self._lock.wait(0.05)

    def add_result_handler(self, handler: Any) -> None:
        """Call ``handler(body)`` in the I/O thread for each results frame (the rpc backend)."""
        self._result_handlers.append(handler)

    def stats(self) -> dict:
        """This client's backlog (without a broker, a backlog lives in the clients).

        ``outbox``: messages per queue not sent yet (waiting for credit);
        ``unacknowledged``: sent, not yet acknowledged by a worker; ``credit``:
        what each worker granted and this client has not used.
        """
        with self._lock:
            outbox = self._outbox.demand()
            unacked = len(self._unacked)
        credit = {peer.name: dict(peer.credit) for peer in list(self._peers)} if hasattr(self, "_peers") else {}
        return {"client_id": self.client_id, "outbox": outbox, "outbox_total": sum(outbox.values()),
                "unacknowledged": unacked, "credit": credit}

    @property
    def waiting(self) -> int:
        """Messages not yet acknowledged by a worker."""
        with self._lock:
            return len(self._outbox) + self._in_flight + len(self._unacked)

    def flush(self, timeout: float | None = None, *, warn_after: float = FLUSH_WARN_EVERY) -> bool:
        """Wait until every sent message was acknowledged by a worker; False on timeout.

        A wait longer than ``warn_after`` seconds is reported, then every few seconds:
        how many tasks, to which endpoints, and how to bound the wait. (:meth:`close`,
        which runs at exit, reports after a moment: there a silent wait looks like a hang.)
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        warn_at = time.monotonic() + warn_after
        with self._lock:
            while self._outbox or self._in_flight or self._unacked:
                if not self._thread.is_alive():
                    return False
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if now >= warn_at:
                    if deadline is None:
                        bound = ("until one does: set producer_flush_timeout (seconds) to bound this wait, "
                                 "or press Ctrl-C to give up on them")
                    else:
                        bound = f"up to {deadline - now:.1f}s more (producer_flush_timeout)"
                    logger.warning("waiting for a worker to take %d task(s) sent to %s, %s",
                                   self.waiting, ", ".join(self.endpoints), bound)
                    warn_at = now + FLUSH_WARN_EVERY
                self._lock.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - now)))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded by ``producer_flush_timeout``), then stop the I/O thread."""
        if self._closing or self.pid != process.pid():
            return
        if timeout is None:
            timeout = self.app.conf.producer_flush_timeout
        try:
            if not self.flush(timeout, warn_after=FLUSH_WARN_FIRST):
                logger.error("closing with %d task(s) not acknowledged by any worker (sent to %s)",
                             self.waiting, ", ".join(self.endpoints))
        finally:  # also when Ctrl-C ends the wait: the I/O thread and its sockets stop either way
            self._closing = True
            self._wake()
            self._thread.join(5)
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _wake(self) -> None:
        # One byte per sleep, not per message: the I/O thread drains everything it finds.
        if not self._awake:
            self._awake = True
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    # --- I/O thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except Exception:
            logger.exception("producer I/O thread failed")
        finally:
            for sock in self._sockets:
                sock.close(linger=0)
            with self._lock:
                self._lock.notify_all()

    def _setup(self) -> None:
        self.context: zmq.Context = zmq.Context.instance()
        max_size = int(self.app.conf.max_message_size)
        self._sockets: list[zmq.Socket] = []
        self._peers = PeerTable()
        if self.bind:
            sock = self.context.socket(zmq.ROUTER)
            protocol.tune_socket(sock, max_size)
            for endpoint in self.endpoints:
                sock.bind(endpoint)
            self._router = sock
            self._sockets.append(sock)
        else:
            self._router = None
        self._poller = zmq.Poller()
        for sock in self._sockets:
            self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if not self.bind:
            for endpoint in self._endpoint_set.current():
                self._link(endpoint)

    def _link(self, endpoint: str) -> None:
        """Connect a DEALER to the worker at ``endpoint`` and say hello."""
        sock = self.context.socket(zmq.DEALER)
        protocol.tune_socket(sock, int(self.app.conf.max_message_size))
        sock.setsockopt(zmq.ROUTING_ID, self.client_id.encode())
        self._secure(sock)
        sock.connect(endpoint)
        peer = self._peers.connect(sock, endpoint)
        self._sockets.append(sock)
        self._poller.register(sock, zmq.POLLIN)
        peer.try_send(protocol.HELLO, protocol.pack({"role": "client", "id": self.client_id, "host": HOSTNAME}))

    def _unlink(self, endpoint: str) -> None:
        """Stop using the worker at ``endpoint`` (its address is gone): what it did not acknowledge goes elsewhere."""
        peer = self._peers.get(endpoint)
        if peer is None:
            return
        with self._lock:
            lost = [p for p in self._unacked.values() if p.peer is peer]
            for pending in lost:
                del self._unacked[pending.id]
                pending.peer = None
            self._outbox.put_back(lost)
        self._peers.drop_link(peer)
        self._poller.unregister(peer.socket)
        self._sockets.remove(peer.socket)
        peer.socket.close(linger=0)
        logger.info("worker %s is gone from DNS: %d unacknowledged task(s) go to another worker", endpoint, len(lost))

    def _refresh_links(self, now: float) -> None:
        """Resolve the DNS entries again; link to new workers, unlink those whose address is gone."""
        wanted = set(self._endpoint_set.current(now))
        linked = {peer.key for peer in self._peers}
        for endpoint in sorted(wanted - linked):
            logger.info("worker %s found in DNS: linking to it", endpoint)
            self._link(endpoint)
        for endpoint in sorted(linked - wanted):
            self._unlink(endpoint)

    def _secure(self, sock: zmq.Socket) -> None:
        """CURVE-encrypt and authenticate the link when the app has keys set."""
        from engine.transport.security import secure_app_client

        secure_app_client(self.app, sock)

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._closing:
            timeout = max(0.0, min(next_beat, self._demand_due) - time.monotonic())
            # pyzmq's Poller.poll truncates a float itself (its annotation says int).
            events = dict(self._poller.poll(timeout * 1000))  # type: ignore[arg-type]
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            self._awake = False
            for sock in list(self._sockets):
                if sock in events:
                    self._receive(sock)
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat(now)
                next_beat = now + HEARTBEAT
                if self._endpoint_set.dynamic and now >= self._endpoint_set.next_refresh:
                    self._refresh_links(now)
            self._dispatch(now)

    def _receive(self, sock: zmq.Socket) -> None:
        routed = sock is self._router
        for _ in range(10_000):
            frame = protocol.receive(sock, routed)
            if frame is None:
                return
            route, kind, body = frame
            peer = self._peers.for_frame(sock, route)
            if peer is None or not kind:
                continue
            peer.last_seen = time.monotonic()
            try:
                if kind == protocol.CREDIT:
                    credit = peer.credit
                    for queue, amount in protocol.unpack(body).items():
                        # Negative amounts: the worker takes back credit we did not use.
                        credit[str(queue)] = max(0, credit.get(str(queue), 0) + int(amount))
                elif kind == protocol.ACKS:
                    self._acknowledge(protocol.unpack(body))
                elif kind == protocol.RESULTS:
                    for handler in self._result_handlers:
                        handler(body)
                elif kind == protocol.HELLO:
                    peer.name = str(protocol.unpack(body).get("id", peer.name))
                elif kind == protocol.RETURN:
                    self._take_back(peer, body)
            except Exception as exc:
                logger.warning("dropping a malformed %r frame from %s: %s", kind, peer.name, exc)

    def _take_back(self, peer: Peer, body: bytes) -> None:
        """A draining worker handed back tasks it will not start: send them to another worker."""
        taken: list[Pending] = []
        with self._lock:
            for raw in split_batch(body):
                message = decode_message(raw)
                pending = self._unacked.get(message.id)
                if pending is not None and pending.peer is not None and pending.peer is not peer:
                    taken.append(pending)  # already sent again to another worker: only say we have it
                    continue
                self._unacked.pop(message.id, None)
                pending = pending or Pending(message.queue, message.id, raw)
                pending.peer = None
                taken.append(pending)
            self._outbox.put_back([pending for pending in taken if pending.peer is None])
            self._lock.notify_all()
        peer.credit = {}  # it grants nothing any more
        peer.try_send(protocol.TAKEN, protocol.pack([pending.id for pending in taken]))
        logger.info("worker %s handed back %d task(s): they go to another worker", peer.name, len(taken))

    def _acknowledge(self, ids: list) -> None:
        with self._lock:
            for task_id in ids:
                self._unacked.pop(task_id, None)
            self._lock.notify_all()

    def _heartbeat(self, now: float) -> None:
        """Tell every worker what waits per queue; take back messages of workers gone silent."""
        with self._lock:
            demand = self._outbox.demand()
            # Lost: its worker went silent, or it was never acknowledged although the worker
            # lives (a worker restarted between receiving and acknowledging, a dropped frame).
            ack_timeout = self.ack_timeout
            lost = [p for p in self._unacked.values()
                    if p.peer is not None and (now - max(p.sent_at, p.peer.last_seen) > PEER_TIMEOUT
                                               or now - p.sent_at > ack_timeout)]
            for pending in lost:
                del self._unacked[pending.id]
                pending.peer = None
            if lost:
                logger.warning("%d task(s) not acknowledged by a silent worker: sending them again", len(lost))
                self._outbox.put_back(lost)
        for peer in self._peers.silent(now):
            peer.credit = {}
            if now - peer.last_seen > PEER_TIMEOUT * 4:
                self._peers.remove(peer)  # a bound client forgets workers long gone
        self._send_demand(now, demand)

    def _send_demand(self, now: float, demand: dict[str, int]) -> None:
        """Tell every worker how many messages wait per queue, and how much of its credit we hold.

        Also our heartbeat. The credit we report is what the worker should count as
        promised to us: it corrects any drift (a frame that could not be sent, a
        worker that restarted).
        """
        self._demand_sent = now
        self._demand_due = math.inf
        waiting = dict(demand)
        for peer in self._peers:
            held = {queue: n for queue, n in peer.credit.items() if n > 0}
            peer.try_send(protocol.DEMAND, protocol.pack({"waiting": waiting, "credit": held}))

    def _dispatch(self, now: float) -> None:
        """Send waiting messages to workers with credit for their queue, in frames of bounded size."""
        with self._lock:
            if not self._outbox:
                self._demand_due = math.inf
                return
            peers = list(self._peers)
            batches: list[tuple[Peer, list[Pending]]] = []
            for queue in self._outbox.queues():
                # Round-robin over the workers with credit for this queue, a chunk each,
                # so one burst is spread over all of them rather than filling the first.
                with_credit = [p for p in peers if p.credit.get(queue, 0) > 0]
                turn = self._turn
                while with_credit and self._outbox.has(queue):
                    peer = with_credit[turn % len(with_credit)]
                    credit = peer.credit
                    items = self._outbox.take(queue, min(credit[queue], BATCH_MAX), self.max_batch_bytes)
                    credit[queue] -= len(items)
                    batches.append((peer, items))
                    if credit[queue] <= 0:
                        with_credit.remove(peer)
                    turn += 1
                self._turn = turn
            # Out of credit: ask now rather than at the next heartbeat, after the task frames
            # (a worker counts the tasks it receives against what was reported waiting).
            ask = bool(self._outbox) and now - self._demand_sent > DEMAND_EVERY
            # Held back: asked a moment ago, maybe before these tasks were queued (a new client's
            # first burst). The loop wakes for it; a later delay() into this queue would not.
            self._demand_due = self._demand_sent + DEMAND_EVERY if self._outbox and not ask else math.inf
            self._in_flight += sum(len(items) for _, items in batches)
        # Packing and sending happen outside the lock, so delay() never waits on them.
        for peer, items in batches:
            try:
                sent = peer.try_send(protocol.TASKS, protocol.pack([p.raw for p in items]))
            except Exception:  # whatever failed, the messages go back to the outbox, not astray
                logger.exception("sending %d task(s) to %s failed: they wait for the next dispatch",
                                 len(items), peer.name)
                sent = False
            with self._lock:
                self._in_flight -= len(items)
                if not sent:
                    peer.credit[items[0].queue] = 0  # full or gone: stop using its credit
                    self._outbox.put_back(items)
                    # Dispatch again at once: another worker may hold credit, and sends into a
                    # non-empty queue do not wake this thread.
                    self._wake()
                    continue
                for p in items:
                    p.peer, p.sent_at = peer, now
                    self._unacked[p.id] = p
        if ask:
            with self._lock:
                demand = self._outbox.demand()
            self._send_demand(now, demand)


#: Producer's methods a task's send goes through, as defined here: a producer whose class or self
#: replaces one sends the general way (engine.core.PlainSender queues into the outbox otherwise).
SENDING_METHODS = {name: Producer.__dict__[name] for name in ("send", "usable")}


@atexit.register
def _flush_all() -> None:
    """Deliver what scripts sent before they exit; Ctrl-C gives up, in one line per client."""
    interrupted = False
    for producer in list(_producers):
        if interrupted:
            producer.close(timeout=0)  # reports what it still held, if anything
            continue
        try:
            producer.close()
        except KeyboardInterrupt:
            # No traceback: the user chose to stop waiting; say what that cost.
            interrupted = True
            logger.error("interrupted: %d task(s) were not handed over to a worker (sent to %s)",
                         producer.waiting, ", ".join(producer.endpoints))
