"""Frames spoken between clients and workers, and the two socket topologies.

Every message is ``[kind, body]`` (a ROUTER socket prefixes the peer's
routing id). Bodies are msgpack, except task batches, which are the core's
batch frame (an array of encoded task messages: many tasks per syscall).

========  ===============  ===================================================
kind      direction        body
========  ===============  ===================================================
``H``     either, first    ``{"role": "client"|"worker", "id": str, "host": str}``
``D``     client → worker  demand and heartbeat: ``{"waiting": {queue: n}, "credit": {queue: n}}``
                           (the credit of this worker the client still holds)
``C``     worker → client  credit: ``{queue: more tasks it may send}`` (added up)
``T``     client → worker  a batch of task messages
``A``     worker → client  acknowledgements: ``[task id, ...]``
``R``     worker → client  results for the ``rpc://`` backend:
                           ``[[task id, state, result, traceback, timestamp], ...]``, with a sixth
                           field, the client id, when sent to a worker that relays them
``B``     worker → client  tasks handed back unstarted by a draining worker (a batch frame, as ``T``)
``K``     client → worker  the ids of the tasks handed back that the client took: ``[task id, ...]``
``Q``     client → worker  a control request: ``{"id": str, "method": str, "arguments": {...}}``
``P``     worker → client  its reply: ``{"id": str, "worker": str, "reply": ...}`` or, when the
                           method failed, ``{"id": str, "worker": str, "error": str}``
========  ===============  ===================================================

Topologies: by default workers *bind* a ROUTER and clients *connect* one
DEALER per worker endpoint (its routing id is the client id, so every worker
knows a client by the same name). In the ventilator pattern
(``transport_bind=True`` / ``engine-worker --connect``) the client binds the
ROUTER and workers connect DEALERs. :class:`Peer` hides which one is in use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import zmq

from engine.core import StateRecord

__all__ = (
    "ACKS", "CONTROL", "CREDIT", "DEMAND", "HELLO", "PEER_TIMEOUT", "REPLY", "RESULTS", "RETURN", "TAKEN", "TASKS",
    "Peer", "PeerTable", "pack",
    "pack_records", "tune_socket", "unpack", "unpack_addressed_records", "unpack_records",
)

logger = logging.getLogger("engine.transport")

HELLO = b"H"
DEMAND = b"D"
CREDIT = b"C"
TASKS = b"T"
ACKS = b"A"
RESULTS = b"R"
CONTROL = b"Q"
REPLY = b"P"
RETURN = b"B"
TAKEN = b"K"

#: Largest frame a socket accepts (bigger ones are dropped by ZeroMQ itself).
MAX_FRAME = 256 * 1024 * 1024
#: Messages a socket queues per peer before it blocks or drops: bounded memory.
HIGH_WATER_MARK = 10_000
#: A peer not heard from for this long is presumed gone: a client sends a silent worker's
#: unacknowledged messages again, a worker takes back a silent client's credit.
PEER_TIMEOUT = 5.0


def pack(body: Any) -> bytes:
    """Encode a control body."""
    return msgpack.packb(body, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode a control body (raises ValueError-family errors on garbage)."""
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def pack_records(records: Iterable[StateRecord], client_id: str | None = None) -> bytes:
    """Encode state records (their results already serialized) as a ``R`` frame body.

    With ``client_id`` each record names the client the states are for, so that a
    worker that forwarded the task can relay them; without, records have the five
    fields every client version reads.
    """
    if client_id is None:
        rows = [[r.task_id, r.state, r.result, r.traceback, r.timestamp] for r in records]
    else:
        rows = [[r.task_id, r.state, r.result, r.traceback, r.timestamp, client_id] for r in records]
    return msgpack.packb(rows, use_bin_type=True)


def unpack_addressed_records(body: bytes) -> list[tuple[StateRecord, str | None]]:
    """Decode a ``R`` frame body into ``(record, client id or None)`` pairs."""
    return [(StateRecord(item[0], item[1], item[2], item[3], item[4]), item[5] if len(item) > 5 else None)
            for item in msgpack.unpackb(body, raw=False)]


def unpack_records(body: bytes) -> list[StateRecord]:
    """Decode a ``R`` frame body into its records (inverse of :func:`pack_records`)."""
    return [record for record, _ in unpack_addressed_records(body)]


def tune_socket(sock: zmq.Socket, max_message_size: int) -> None:
    """Bounded queues, a frame size limit, and no lingering on close by default."""
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.MAXMSGSIZE, min(max_message_size, MAX_FRAME))
    sock.setsockopt(zmq.LINGER, 0)


class Peer:
    """The other end of one link: a DEALER socket, or a routing id on a ROUTER socket.

    ``credit`` is the credit of this link per queue: on a client, what the worker
    granted and the client has not used; on a worker, what it granted the client.
    ``waiting`` and ``last_task`` are used by workers only: what the client last
    reported waiting per queue, and when it last sent tasks (monotonic seconds).
    """

    __slots__ = ("credit", "key", "last_seen", "last_task", "name", "route", "socket", "waiting")

    def __init__(self, socket: zmq.Socket, route: bytes | None, key: Any, name: str = "?") -> None:
        self.socket = socket
        self.route = route
        self.key = key
        self.name = name
        self.last_seen = 0.0
        self.credit: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.last_task = 0.0

    def send(self, kind: bytes, body: bytes) -> None:
        """Send one frame without blocking; raises zmq.Again when the peer's queue is full."""
        if self.route is None:
            self.socket.send_multipart((kind, body), flags=zmq.NOBLOCK, copy=False)
        else:
            self.socket.send_multipart((self.route, kind, body), flags=zmq.NOBLOCK, copy=False)

    def try_send(self, kind: bytes, body: bytes) -> bool:
        """Send without blocking; False when the peer's queue is full or the socket refused it."""
        try:
            self.send(kind, body)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            logger.debug("send to %s failed: %s", self.name, exc)
            return False

    def __repr__(self) -> str:
        return f"<Peer {self.name}>"


class PeerTable:
    """The peers of one end of the transport, known by key, for both topologies.

    A DEALER link (we connected) has exactly one peer, added by :meth:`connect`
    and known by its endpoint; on a ROUTER socket (we bound) every routing id
    that speaks is a peer, added on its first frame.
    """

    def __init__(self) -> None:
        self.by_key: dict[Any, Peer] = {}
        self._by_socket: dict[zmq.Socket, Peer] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.by_key.values()))

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, Peer) and self.by_key.get(peer.key) is peer

    def get(self, key: Any) -> Peer | None:
        """The peer known by ``key`` (an endpoint or a routing id), or None."""
        return self.by_key.get(key)

    def connect(self, sock: zmq.Socket, endpoint: str) -> Peer:
        """Add the one peer at the end of a DEALER ``sock`` connected to ``endpoint``."""
        peer = self.by_key[endpoint] = self._by_socket[sock] = Peer(sock, None, endpoint, endpoint)
        return peer

    def for_frame(self, sock: zmq.Socket, route: bytes | None) -> Peer | None:
        """The peer a frame came from: the DEALER link's peer, or the routing id's (added when new)."""
        if route is None:
            return self._by_socket.get(sock)
        peer = self.by_key.get(route)
        if peer is None:
            peer = self.by_key[route] = Peer(sock, route, route, route.decode(errors="replace"))
        return peer

    def drop_link(self, peer: Peer) -> None:
        """Forget a DEALER link's peer (its socket is being closed)."""
        self.by_key.pop(peer.key, None)
        self._by_socket.pop(peer.socket, None)

    def remove(self, peer: Peer) -> None:
        """Forget a routed peer (a DEALER link's peer stays: it is the link itself)."""
        if peer.route is not None:
            self.by_key.pop(peer.key, None)

    def silent(self, now: float, timeout: float = PEER_TIMEOUT) -> list[Peer]:
        """Peers heard from before, but not for ``timeout`` seconds."""
        return [peer for peer in self.by_key.values() if peer.last_seen and now - peer.last_seen > timeout]


def receive(sock: zmq.Socket, routed: bool) -> tuple[bytes | None, bytes, bytes] | None:
    """Receive one ``(route, kind, body)`` without blocking; None when nothing is waiting.

    Frames of the wrong shape are returned with kind ``b""`` so the caller can count them.
    """
    try:
        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
    except zmq.Again:
        return None
    if routed:
        if len(frames) != 3:
            return (frames[0] if frames else None, b"", b"")
        return frames[0], frames[1], frames[2]
    if len(frames) != 2:
        return None, b"", b""
    return None, frames[0], frames[1]
