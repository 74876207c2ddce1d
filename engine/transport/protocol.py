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
``R``     worker → client  results for the ``rpc://`` backend
========  ===============  ===================================================

Topologies: by default workers *bind* a ROUTER and clients *connect* one
DEALER per worker endpoint (its routing id is the client id, so every worker
knows a client by the same name). In the ventilator pattern
(``transport_bind=True`` / ``engine-worker --connect``) the client binds the
ROUTER and workers connect DEALERs. :class:`Peer` hides which one is in use.
"""

from __future__ import annotations

from typing import Any

import logging

import msgpack
import zmq

__all__ = ("ACKS", "CREDIT", "DEMAND", "HELLO", "RESULTS", "TASKS", "Peer", "pack", "tune_socket", "unpack")

logger = logging.getLogger("engine.transport")

HELLO = b"H"
DEMAND = b"D"
CREDIT = b"C"
TASKS = b"T"
ACKS = b"A"
RESULTS = b"R"

#: Largest frame a socket accepts (bigger ones are dropped by ZeroMQ itself).
MAX_FRAME = 256 * 1024 * 1024
#: Messages a socket queues per peer before it blocks or drops: bounded memory.
HIGH_WATER_MARK = 10_000


def pack(body: Any) -> bytes:
    """Encode a control body."""
    return msgpack.packb(body, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode a control body (raises ValueError-family errors on garbage)."""
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def tune_socket(sock: zmq.Socket, max_message_size: int) -> None:
    """Bounded queues, a frame size limit, and no lingering on close by default."""
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.MAXMSGSIZE, min(max_message_size, MAX_FRAME))
    sock.setsockopt(zmq.LINGER, 0)


class Peer:
    """The other end of one link: a DEALER socket, or a routing id on a ROUTER socket."""

    __slots__ = ("key", "last_seen", "name", "route", "socket")

    def __init__(self, socket: zmq.Socket, route: bytes | None, key: Any, name: str = "?") -> None:
        self.socket = socket
        self.route = route
        self.key = key
        self.name = name
        self.last_seen = 0.0

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
