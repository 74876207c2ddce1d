"""The worker's end of the transport: receives task batches, grants credit, acknowledges.

Credit keeps every worker within its window: a client may send a queue's
tasks only against credit this worker granted for that queue. The worker
grants from its free capacity (window minus waiting tasks minus credit
already out), first a small standing credit to every live client so a lone
task goes out at once, then what clients report waiting (their demand).
Credit of a client that went silent is taken back.
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
from engine.transport.protocol import Peer, PeerTable
from engine.utils.hostname import HOSTNAME

__all__ = ("Consumer",)

logger = logging.getLogger("engine.transport.consumer")


class Consumer:
    """The worker's sockets and the credit it granted each client (on each :class:`Peer`)."""

    def __init__(self, context: zmq.Context, worker_id: str, binds: list[str], connects: list[str],
                 queues: list[str], max_message_size: int, curve: tuple[str, str] | None = None) -> None:
        self.worker_id = worker_id
        self.queues = list(queues)
        self.sockets: list[zmq.Socket] = []
        self.peers = PeerTable()
        #: Task ids to acknowledge per peer key, sent by the next :meth:`flush`.
        self.acks: dict[Any, list[str]] = {}
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
        hello = protocol.pack({"role": "worker", "id": worker_id, "host": HOSTNAME})
        for endpoint in connects:
            sock = context.socket(zmq.DEALER)
            protocol.tune_socket(sock, max_message_size)
            sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
            sock.connect(endpoint)
            self.sockets.append(sock)
            peer = self.peers.connect(sock, endpoint)
            peer.last_seen = time.monotonic()
            peer.try_send(protocol.HELLO, hello)

    def receive(self, sock: zmq.Socket, limit: int = 1000) -> Iterator[tuple[Peer, list[bytes]]]:
        """Yield ``(peer, raw task messages)`` for each task batch waiting on ``sock``."""
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
            try:
                if kind == protocol.TASKS:
                    yield peer, split_batch(body)
                elif kind == protocol.DEMAND:
                    report = protocol.unpack(body)
                    peer.waiting = {str(q): int(n) for q, n in report["waiting"].items()}
                    # The client's count of our credit it holds is the truth (see the producer).
                    peer.credit = {str(q): int(n) for q, n in report["credit"].items() if q in self.queues}
                elif kind == protocol.HELLO:
                    peer.name = str(protocol.unpack(body).get("id", peer.name))
                    peer.credit = {}  # a (re)started client holds no credit of ours
                else:
                    logger.warning("dropped a frame of unknown kind %r from %s", kind[:8], peer.name)
            except (MessageDecodeError, ValueError, TypeError, AttributeError, KeyError) as exc:
                logger.warning("dropped a malformed %r frame from %s: %s", kind[:8], peer.name, exc)

    @staticmethod
    def consumed(peer: Peer, queue: str, count: int = 1) -> None:
        """Count ``count`` tasks of ``queue`` from ``peer`` against the credit it held."""
        credit = peer.credit
        credit[queue] = max(0, credit.get(queue, 0) - count)

    @staticmethod
    def consumed_any(peer: Peer) -> None:
        """Count one task of unknown queue (it could not be decoded) against ``peer``'s credit."""
        credit = peer.credit
        for queue, amount in credit.items():
            if amount > 0:
                credit[queue] = amount - 1
                return

    def ack(self, peer: Peer, task_id: str) -> None:
        """Acknowledge a task to the client that sent it (sent with the next :meth:`flush`)."""
        self.acks.setdefault(peer.key, []).append(task_id)

    def outstanding(self) -> int:
        """Credit granted and not yet used, over all clients and queues."""
        return sum(sum(peer.credit.values()) for peer in self.peers)

    def grant(self, free: int, standing: int) -> None:
        """Hand out up to ``free`` credit: standing credit to every client, then by demand.

        When nothing is free and a client is waiting, credit idle clients hold
        (they report nothing waiting) is taken back, so idle processes, such as
        web-server workers that send a task now and then, cannot lock out busy ones.
        """
        if free <= 0:
            self._reclaim_idle()
            return
        grants: dict[Peer, dict[str, int]] = {}
        for stage in ("standing", "demand"):
            for peer in self.peers:
                if free <= 0:
                    break
                held = peer.credit
                for queue in self.queues:
                    target = standing if stage == "standing" else standing + peer.waiting.get(queue, 0)
                    give = min(free, target - held.get(queue, 0))
                    if give > 0:
                        held[queue] = held.get(queue, 0) + give
                        given = grants.setdefault(peer, {})
                        given[queue] = given.get(queue, 0) + give
                        free -= give
        for peer, credit in grants.items():
            peer.try_send(protocol.CREDIT, protocol.pack(credit))

    def _reclaim_idle(self) -> None:
        waiting = {q for peer in self.peers for q, n in peer.waiting.items() if n > 0 and q in self.queues}
        if not waiting:
            return
        for peer in self.peers:
            if any(peer.waiting.get(q, 0) > 0 for q in waiting):
                continue
            taken = {q: -n for q, n in peer.credit.items() if q in waiting and n > 0}
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
        """Forget clients that went silent, taking back their credit."""
        for peer in self.peers.silent(now):
            if peer.route is not None:
                logger.info("client %s went silent; taking back its credit", peer.name)
                self.peers.remove(peer)
                self.acks.pop(peer.key, None)

    def stop_granting(self) -> None:
        """Warm shutdown: tell clients nothing more (they re-send unacked work elsewhere)."""
        self.queues = []

    def close(self) -> None:
        """Close the sockets (and stop the CURVE authenticator)."""
        for sock in self.sockets:
            sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
