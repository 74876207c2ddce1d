"""Fakes the in-process tests share (Dramatiq's stub broker, for our transport)."""

from __future__ import annotations

import collections

import zmq

from engine.transport import protocol


class FakeSocket:
    """Stands in for a ZeroMQ socket: records sent frames, replays ``inbox``, refuses sends when ``refuse``.

    A refused send raises ``zmq.Again``, as a real socket does when the peer's queue is full.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, ...]] = []
        self.inbox: collections.deque[list[bytes]] = collections.deque()
        self.refuse = False

    def send_multipart(self, frames, flags=0, copy=True):
        if self.refuse:
            raise zmq.Again()
        self.sent.append(tuple(bytes(f) for f in frames))

    def recv_multipart(self, flags=0):
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.popleft()

    def frames(self, kind: bytes) -> list:
        """Decoded bodies of the sent frames of ``kind`` (the last two parts are kind and body)."""
        return [protocol.unpack(f[-1]) for f in self.sent if f[-2] == kind]
