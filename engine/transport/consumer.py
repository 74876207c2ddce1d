"""The worker's end of the transport: receives task batches, grants credit, acknowledges.

Credit keeps every worker within its window: a client may send a queue's
tasks only against credit this worker granted for that queue. Credit follows
demand, not connections: the worker grants from its free capacity (window
minus waiting tasks minus credit already out) to the clients that report
tasks waiting, round robin, and only then a small standing credit to clients
that sent tasks lately, so their next lone task goes out without asking.
A client that went idle holds no credit for long: it is taken back after
:data:`ACTIVE_SECONDS`, or at once when another client waits and nothing is
free. However many clients are connected (every web-server process is one),
one that arrives last gets its tasks run as soon as the worker has room.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import zmq

from engine.core import split_batch
from engine.exceptions import MessageDecodeError
from engine.transport import protocol
from engine.transport.discovery import EndpointSet
from engine.transport.protocol import Peer, PeerTable
from engine.utils.hostname import HOSTNAME

__all__ = ("Consumer",)

logger = logging.getLogger("engine.transport.consumer")

#: Milliseconds a link to a producer gone from DNS may still send what was queued for it.
UNLINK_LINGER_MS = 1000
#: A client that sent tasks within this many seconds keeps standing credit; an idle one's is taken back.
ACTIVE_SECONDS = 1.0


class Consumer:
    """The worker's sockets and the credit it granted each client (on each :class:`Peer`)."""

    def __init__(self, context: zmq.Context, worker_id: str, binds: list[str], connects: list[str],
                 queues: list[str], max_message_size: int, curve: tuple[str, str] | None = None,
                 max_peers: int | None = None, dns_refresh: float = 5.0) -> None:
        self.worker_id = worker_id
        self._context = context
        self._max_message_size = max_message_size
        self.queues = list(queues)
        self.sockets: list[zmq.Socket] = []
        self.peers = PeerTable()
        #: Task ids to acknowledge per peer key, sent by the next :meth:`flush`.
        self.acks: dict[Any, list[str]] = {}
        #: Replayed task ids to acknowledge to a client (by routing id) when it is heard from again.
        self._unheard: dict[Any, list[str]] = {}
        self._unheard_until = 0.0
        # Subsets of the peers, by key, so that granting costs O(clients that matter), not
        # O(clients connected): those that reported tasks waiting, those that sent tasks lately,
        # and those that hold credit.
        self._wanting: dict[Any, Peer] = {}
        self._active: dict[Any, Peer] = {}
        self._holders: dict[Any, Peer] = {}
        self._turn = 0
        #: Control requests received (``(peer, request)``), answered by the supervisor (engine.worker.control).
        self.requests: list[tuple[Peer, dict]] = []
        #: Ids of tasks handed back (draining) that their client took, per client: ``(peer, ids)``.
        self.taken: list[tuple[Peer, list[str]]] = []
        self.router: zmq.Socket | None = None
        self.authenticator: Any = None
        if binds:
            self.router = context.socket(zmq.ROUTER)
            protocol.tune_socket(self.router, max_message_size)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            if curve is not None:
                from engine.transport.security import secure_server

                self.authenticator = secure_server(context, self.router, *curve)
            for endpoint in binds:
                self.router.bind(endpoint)
            self.sockets.append(self.router)
        self._hello = protocol.pack({"role": "worker", "id": worker_id, "host": HOSTNAME})
        #: The producers to connect to (the ventilator pattern): ``dns+tcp://`` names resolved, and
        #: resolved again, as a client resolves the workers it sends to.
        self.connect_set = EndpointSet(connects, worker_id, max_peers, dns_refresh)
        #: Bumped whenever a socket is opened or closed after start: the supervisor's poller follows it.
        self.generation = 0
        for endpoint in self.connect_set.current():
            self._link(endpoint)

    def _link(self, endpoint: str) -> None:
        """Connect a DEALER to the producer at ``endpoint`` and say hello."""
        sock = self._context.socket(zmq.DEALER)
        protocol.tune_socket(sock, self._max_message_size)
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        sock.connect(endpoint)
        self.sockets.append(sock)
        peer = self.peers.connect(sock, endpoint)
        peer.last_seen = time.monotonic()
        peer.try_send(protocol.HELLO, self._hello)
        self.generation += 1

    def _unlink(self, peer: Peer) -> None:
        """Close the link to a producer whose address is gone (the tasks it sent stay accepted here)."""
        self.peers.drop_link(peer)
        for table in (self.acks, self._wanting, self._active, self._holders):
            table.pop(peer.key, None)
        self.sockets.remove(peer.socket)
        # A moment to let acknowledgements and results already queued reach it, should it still be up.
        peer.socket.close(linger=UNLINK_LINGER_MS)
        self.generation += 1

    def refresh_links(self, now: float) -> None:
        """When due, resolve the ``dns+tcp://`` producers again: connect to new ones, close links to those gone."""
        if not self.connect_set.dynamic or now < self.connect_set.next_refresh:
            return
        wanted = set(self.connect_set.current(now))
        linked = {peer.key: peer for peer in self.peers if peer.route is None}
        for endpoint in sorted(wanted - set(linked)):
            logger.info("producer %s found in DNS: connecting to it", endpoint)
            self._link(endpoint)
        for endpoint in sorted(set(linked) - wanted):
            logger.info("producer %s is gone from DNS: closing the link", endpoint)
            self._unlink(linked[endpoint])

    def receive(self, sock: zmq.Socket, limit: int = 1000) -> Iterator[tuple[Peer, bytes, list[bytes]]]:
        """Yield ``(peer, frame, raw task messages)`` for each task batch frame waiting on ``sock``."""
        routed = sock is self.router
        for _ in range(limit):
            frame = protocol.receive(sock, routed)
            if frame is None:
                return
            route, kind, body = frame
            peer = self.peers.for_frame(sock, route)
            if peer is None:
                continue
            peer.last_seen = time.monotonic()
            if self._unheard and peer.key in self._unheard:
                self.ack(peer, self._unheard.pop(peer.key))
            try:
                if kind == protocol.TASKS:
                    peer.last_task = peer.last_seen
                    self._active[peer.key] = peer
                    yield peer, body, split_batch(body)
                elif kind == protocol.DEMAND:
                    report = protocol.unpack(body)
                    peer.waiting = {str(q): int(n) for q, n in report["waiting"].items()}
                    # The client's count of our credit it holds is the truth (see the producer).
                    peer.credit = {str(q): int(n) for q, n in report["credit"].items() if q in self.queues}
                    if any(peer.waiting.get(q, 0) > peer.credit.get(q, 0) for q in self.queues):
                        self._wanting[peer.key] = peer
                    if peer.credit:
                        self._holders[peer.key] = peer
                elif kind == protocol.HELLO:
                    peer.name = str(protocol.unpack(body).get("id", peer.name))
                    peer.credit = {}  # a (re)started client holds no credit of ours
                elif kind == protocol.TAKEN:
                    self.taken.append((peer, [str(task_id) for task_id in protocol.unpack(body)]))
                elif kind == protocol.CONTROL:
                    request = protocol.unpack(body)
                    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                        raise ValueError("a control request is a map with a method name")
                    self.requests.append((peer, request))
                else:
                    logger.warning("dropped a frame of unknown kind %r from %s", kind[:8], peer.name)
            except (MessageDecodeError, ValueError, TypeError, AttributeError, KeyError) as exc:
                logger.warning("dropped a malformed %r frame from %s: %s", kind[:8], peer.name, exc)

    @staticmethod
    def consumed(peer: Peer, queue: str, count: int = 1) -> None:
        """Count ``count`` tasks of ``queue`` from ``peer`` against the credit it held and what it had waiting."""
        credit = peer.credit
        credit[queue] = max(0, credit.get(queue, 0) - count)
        waiting = peer.waiting.get(queue)
        if waiting:  # they were among the tasks it reported waiting: do not grant for them again
            peer.waiting[queue] = max(0, waiting - count)

    @staticmethod
    def consumed_any(peer: Peer) -> None:
        """Count one task of unknown queue (it could not be decoded) against ``peer``'s credit."""
        credit = peer.credit
        for queue, amount in credit.items():
            if amount > 0:
                credit[queue] = amount - 1
                return

    def ack(self, peer: Peer, task_ids: list[str]) -> None:
        """Acknowledge tasks to the client that sent them (sent with the next :meth:`flush`)."""
        self.acks.setdefault(peer.key, []).extend(task_ids)

    def acknowledge_when_heard(self, ids_by_client: dict[Any, list[str]], within: float = 60.0) -> None:
        """Acknowledge these replayed tasks to each client when it sends anything, for ``within`` seconds.

        A worker killed after journaling a frame and before its acknowledgement
        went out replays the frame's tasks; their client, not told, would send
        them again to another worker after ``transport_ack_timeout``, and they
        would run twice. Its link reconnects by itself: the first frame it sends
        gets the acknowledgement.
        """
        for key, ids in ids_by_client.items():
            self._unheard.setdefault(key, []).extend(ids)
        self._unheard_until = time.monotonic() + within

    def outstanding(self) -> int:
        """Credit granted and not yet used, over all clients and queues."""
        total = 0
        for key, peer in list(self._holders.items()):
            held = sum(peer.credit.values())
            if held <= 0 or peer not in self.peers:
                del self._holders[key]  # only clients that hold credit are counted, not every client
            else:
                total += held
        return total

    def grant(self, free: int, standing: int) -> None:
        """Hand out up to ``free`` credit: first to clients with tasks waiting, then standing credit.

        Credit follows demand, not connections. Clients that report waiting
        tasks share ``free`` round robin (a fair share each, the rest to the
        next in turn; the first in turn rotates), so a client that arrives last
        gets credit as soon as the worker has room. What is left becomes standing
        credit (``standing`` per queue) for clients that sent tasks within
        :data:`ACTIVE_SECONDS`, so their next task goes out without asking. Idle
        clients get none, and when nothing is free while a client waits, credit
        held by clients with nothing waiting is taken back for it.
        """
        if not self.queues:
            return
        if free <= 0:
            if self._wanting:
                self._reclaim_for_waiting()
            return
        grants: dict[Peer, dict[str, int]] = {}
        if self._wanting:
            free = self._grant_demand(free, grants)
        if free > 0 and self._active:
            self._grant_standing(free, standing, grants)
        for peer, credit in grants.items():
            self._holders[peer.key] = peer
            peer.try_send(protocol.CREDIT, protocol.pack(credit))

    def _grant_demand(self, free: int, grants: dict[Peer, dict[str, int]]) -> int:
        """Share ``free`` among clients' unmet demand (waiting minus credit held); return what is left."""
        wants: list[list[Any]] = []  # [peer, queue, unmet]
        for key, peer in list(self._wanting.items()):
            unmet: list[list[Any]] = [[peer, q, peer.waiting.get(q, 0) - peer.credit.get(q, 0)] for q in self.queues]
            unmet = [w for w in unmet if w[2] > 0]
            if not unmet or peer not in self.peers:
                del self._wanting[key]
            wants.extend(unmet)
        if not wants:
            return free
        turn = self._turn % len(wants)
        self._turn += 1
        wants = wants[turn:] + wants[:turn]
        while free > 0 and wants:
            share = max(1, free // len(wants))
            still: list[list[Any]] = []
            for want in wants:
                give = min(want[2], share, free)
                if give <= 0:
                    break
                peer, queue = want[0], want[1]
                peer.credit[queue] = peer.credit.get(queue, 0) + give
                given = grants.setdefault(peer, {})
                given[queue] = given.get(queue, 0) + give
                free -= give
                want[2] -= give
                if want[2] > 0:
                    still.append(want)
            wants = still
        return free

    def _grant_standing(self, free: int, standing: int, grants: dict[Peer, dict[str, int]]) -> None:
        now = time.monotonic()
        for key, peer in list(self._active.items()):
            if now - peer.last_task > ACTIVE_SECONDS or peer not in self.peers:
                del self._active[key]
                continue
            for queue in self.queues:
                give = min(free, standing - peer.credit.get(queue, 0))
                if give > 0:
                    peer.credit[queue] = peer.credit.get(queue, 0) + give
                    given = grants.setdefault(peer, {})
                    given[queue] = given.get(queue, 0) + give
                    free -= give
            if free <= 0:
                return

    def _reclaim_for_waiting(self) -> None:
        """Nothing is free and a client waits: take back credit held by clients with nothing waiting."""
        waiting = {q for peer in self._wanting.values() for q, n in peer.waiting.items()
                   if n > peer.credit.get(q, 0) and q in self.queues}
        if not waiting:
            return
        for peer in list(self._holders.values()):
            taken = {q: -n for q, n in peer.credit.items() if q in waiting and n > 0 and not peer.waiting.get(q, 0)}
            if taken:
                for queue in taken:
                    peer.credit[queue] = 0
                peer.try_send(protocol.CREDIT, protocol.pack(taken))

    def reclaim_idle(self, now: float) -> None:
        """Take back credit from clients that hold some, wait for nothing, and sent no task lately."""
        for peer in list(self._holders.values()):
            if now - peer.last_task <= ACTIVE_SECONDS:
                continue
            taken = {q: -n for q, n in peer.credit.items() if n > 0 and not peer.waiting.get(q, 0)}
            if taken:
                for queue in taken:
                    peer.credit[queue] = 0
                peer.try_send(protocol.CREDIT, protocol.pack(taken))

    def heartbeat(self) -> None:
        """Tell every client this worker is alive (an empty credit frame)."""
        body = protocol.pack({})
        for peer in self.peers:
            peer.try_send(protocol.CREDIT, body)

    def flush(self) -> None:
        """Send the acknowledgements collected since the last flush, one frame per client."""
        if not self.acks:
            return
        acks, self.acks = self.acks, {}
        for key, ids in acks.items():
            peer = self.peers.get(key)
            if peer is not None:
                peer.try_send(protocol.ACKS, protocol.pack(ids))

    def find_client(self, client_id: str) -> Peer | None:
        """The peer of the client known by ``client_id`` (the ``reply_to`` of its messages), if connected."""
        peer = self.peers.get(client_id.encode())
        if peer is None:  # a producer we connected to (ventilator) is known by endpoint, and by name
            peer = next((p for p in self.peers if p.name == client_id), None)
            if peer is None and len(self.peers) == 1 and self.router is None:
                peer = next(iter(self.peers))  # connected to one producer: it is the one
        return peer

    def expire(self, now: float) -> None:
        """Forget clients that went silent, taking back their credit (and replayed tasks' acks not delivered)."""
        if self._unheard and now > self._unheard_until:
            self._unheard.clear()  # those clients are gone: their tasks run here anyway
        for peer in self.peers.silent(now):
            if peer.route is not None:
                logger.info("client %s went silent; taking back its credit", peer.name)
                self.peers.remove(peer)
                for table in (self.acks, self._wanting, self._active, self._holders):
                    table.pop(peer.key, None)

    def stop_granting(self) -> None:
        """Warm shutdown: tell clients nothing more (they re-send unacked work elsewhere)."""
        self.queues = []

    def close(self) -> None:
        """Close the sockets (and stop the CURVE authenticator)."""
        for sock in self.sockets:
            sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
