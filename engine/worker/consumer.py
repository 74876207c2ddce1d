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
import socket
import time
from collections.abc import Iterator
from typing import Any

import zmq

from engine.core import split_batch
from engine.exceptions import MessageDecodeError
from engine.transport import protocol
from engine.transport.protocol import Peer

__all__ = ("Consumer",)

logger = logging.getLogger("engine.worker.consumer")

#: A client not heard from for this long is dropped and its credit taken back.
PEER_TIMEOUT = 5.0


class Consumer:
    """Sockets and per-client credit of one worker."""

    def __init__(self, context: zmq.Context, worker_id: str, binds: list[str], connects: list[str],
                 queues: list[str], max_message_size: int, curve: tuple[str, str] | None = None) -> None:
        self.worker_id = worker_id
        self.queues = list(queues)
        self.sockets: list[zmq.Socket] = []
        self.peers: dict[Any, Peer] = {}
        self.demand: dict[Any, dict[str, int]] = {}
        self.granted: dict[Any, dict[str, int]] = {}
        self.acks: dict[Any, list[str]] = {}
        self.dropped_frames = 0
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
        hello = protocol.pack({"role": "worker", "id": worker_id, "host": socket.gethostname()})
        for endpoint in connects:
            sock = context.socket(zmq.DEALER)
            protocol.tune_socket(sock, max_message_size)
            sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
            sock.connect(endpoint)
            self.sockets.append(sock)
            peer = self._add_peer(Peer(sock, None, endpoint, endpoint))
            peer.last_seen = time.monotonic()
            self._send(peer, protocol.HELLO, hello)

    def _add_peer(self, peer: Peer) -> Peer:
        self.peers[peer.key] = peer
        self.demand[peer.key] = {}
        self.granted[peer.key] = {}
        return peer

    def receive(self, sock: zmq.Socket, limit: int = 1000) -> Iterator[tuple[Peer, list[bytes]]]:
        """Yield ``(peer, raw task messages)`` for each task batch waiting on ``sock``."""
        routed = sock is self.router
        for _ in range(limit):
            frame = protocol.receive(sock, routed)
            if frame is None:
                return
            route, kind, body = frame
            peer = self._peer_for(sock, route)
            if peer is None:
                self.dropped_frames += 1
                continue
            peer.last_seen = time.monotonic()
            try:
                if kind == protocol.TASKS:
                    yield peer, split_batch(body)
                elif kind == protocol.DEMAND:
                    report = protocol.unpack(body)
                    self.demand[peer.key] = {str(q): int(n) for q, n in report["waiting"].items()}
                    # The client's count of our credit it holds is the truth (see the producer).
                    self.granted[peer.key] = {str(q): int(n) for q, n in report["credit"].items()
                                              if q in self.queues}
                elif kind == protocol.HELLO:
                    peer.name = str(protocol.unpack(body).get("id", peer.name))
                    self.granted[peer.key] = {}  # a (re)started client holds no credit of ours
                else:
                    self.dropped_frames += 1
                    logger.warning("dropped a frame of unknown kind %r from %s", kind[:8], peer.name)
            except (MessageDecodeError, ValueError, TypeError, AttributeError, KeyError) as exc:
                self.dropped_frames += 1
                logger.warning("dropped a malformed %r frame from %s: %s", kind[:8], peer.name, exc)

    def _peer_for(self, sock: zmq.Socket, route: bytes | None) -> Peer | None:
        if route is None:
            for peer in self.peers.values():
                if peer.socket is sock:
                    return peer
            return None
        peer = self.peers.get(route)
        if peer is None:
            peer = self._add_peer(Peer(sock, route, route, route.decode(errors="replace")))
        return peer

    def consumed(self, peer: Peer, queue: str, count: int = 1) -> None:
        """Count ``count`` tasks of ``queue`` from ``peer`` against the credit it held."""
        granted = self.granted[peer.key]
        granted[queue] = max(0, granted.get(queue, 0) - count)

    def consumed_any(self, peer: Peer) -> None:
        """Count one task of unknown queue (it could not be decoded) against ``peer``'s credit."""
        granted = self.granted[peer.key]
        for queue, amount in granted.items():
            if amount > 0:
                granted[queue] = amount - 1
                return

    def ack(self, peer: Peer, task_id: str) -> None:
        """Acknowledge a task to the client that sent it (sent with the next :meth:`flush`)."""
        self.acks.setdefault(peer.key, []).append(task_id)

    def outstanding(self) -> int:
        """Credit granted and not yet used, over all clients and queues."""
        return sum(sum(q.values()) for q in self.granted.values())

    def grant(self, free: int, standing: int) -> None:
        """Hand out up to ``free`` credit: standing credit to every client, then by demand.

        When nothing is free and a client is waiting, credit idle clients hold
        (they report nothing waiting) is taken back, so idle processes, such as
        web-server workers that send a task now and then, cannot lock out busy ones.
        """
        if free <= 0:
            self._reclaim_idle()
            return
        if not self.peers:
            return
        grants: dict[Any, dict[str, int]] = {}
        for stage in ("standing", "demand"):
            for key, peer in self.peers.items():
                if free <= 0:
                    break
                held = self.granted[key]
                wanted = self.demand[key]
                for queue in self.queues:
                    target = standing if stage == "standing" else standing + wanted.get(queue, 0)
                    give = min(free, target - held.get(queue, 0))
                    if give > 0:
                        held[queue] = held.get(queue, 0) + give
                        grants.setdefault(key, {})[queue] = grants.get(key, {}).get(queue, 0) + give
                        free -= give
        for key, credit in grants.items():
            self._send(self.peers[key], protocol.CREDIT, protocol.pack(credit))

    def _reclaim_idle(self) -> None:
        waiting = {q for key in self.peers for q, n in self.demand[key].items() if n > 0 and q in self.queues}
        if not waiting:
            return
        for key, held in self.granted.items():
            if any(self.demand[key].get(q, 0) > 0 for q in waiting):
                continue
            taken = {q: -n for q, n in held.items() if q in waiting and n > 0}
            if taken:
                for queue in taken:
                    held[queue] = 0
                self._send(self.peers[key], protocol.CREDIT, protocol.pack(taken))

    def heartbeat(self) -> None:
        """Tell every client this worker is alive (an empty credit frame)."""
        body = protocol.pack({})
        for peer in list(self.peers.values()):
            self._send(peer, protocol.CREDIT, body)

    def flush(self) -> None:
        """Send the acknowledgements collected since the last flush, one frame per client."""
        if not self.acks:
            return
        acks, self.acks = self.acks, {}
        for key, ids in acks.items():
            peer = self.peers.get(key)
            if peer is not None:
                self._send(peer, protocol.ACKS, protocol.pack(ids))

    def send_to(self, client_id: str, kind: bytes, body: bytes) -> bool:
        """Send a frame to a client by id (the ``reply_to`` of its messages)."""
        peer = self.peers.get(client_id.encode())
        if peer is None:  # a client we connected to (ventilator) is known by endpoint, not id
            peer = next((p for p in self.peers.values() if p.name == client_id), None)
            if peer is None and len(self.peers) == 1 and self.router is None:
                peer = next(iter(self.peers.values()))  # connected to one producer: it is the one
        if peer is None:
            return False
        return self._send(peer, kind, body)

    def send_peer(self, peer: Peer, kind: bytes, body: bytes) -> bool:
        """Send a frame to a known peer (if it is still connected)."""
        if peer.key not in self.peers:
            return False
        return self._send(peer, kind, body)

    def expire(self, now: float) -> None:
        """Forget clients that went silent, taking back their credit."""
        for key, peer in list(self.peers.items()):
            if peer.route is not None and now - peer.last_seen > PEER_TIMEOUT:
                logger.info("client %s went silent; taking back its credit", peer.name)
                for table in (self.peers, self.demand, self.granted, self.acks):
                    table.pop(key, None)

    def stop_granting(self) -> None:
        """Warm shutdown: tell clients nothing more (they re-send unacked work elsewhere)."""
        self.queues = []

    @staticmethod
    def _send(peer: Peer, kind: bytes, body: bytes) -> bool:
        return peer.try_send(kind, body)

    def close(self) -> None:
        """Close the sockets (and stop the CURVE authenticator)."""
        for sock in self.sockets:
            sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
