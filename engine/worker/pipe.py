"""Length-prefixed frames over the pipes between the supervisor and its children.

A frame is ``<u32 length><u8 kind><payload>``. Writers collect frames and
write them with one syscall (many tasks per write when busy, at once when
idle); the supervisor's writes never block, so a slow child cannot stall it.
A raw pipe with batched writes rather than ``multiprocessing.Queue``, which
pickles and locks per message (``bench/RESULTS.md`` has the measured ratio).
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import TYPE_CHECKING

from engine.core import MAX_PIPE_FRAME, pack_frame, split_frames

if TYPE_CHECKING:
    from engine.worker.report_log import ReportLog

__all__ = (
    "DONE",
    "RECORD",
    "REVOKE",
    "SEND",
    "STOP",
    "TASK",
    "FrameReader",
    "FrameWriter",
    "open_pipe",
    "split_frames",
)

#: A frame's header: payload length and kind (engine.core's pack_frame and split_frames, compiled).
HEADER = struct.Struct("<IB")

# supervisor -> child
TASK = 1
STOP = 2
#: Task ids (a msgpack list) this child holds and must not start: they were revoked.
REVOKE = 3
# child -> supervisor
DONE = 10
RECORD = 11
SEND = 12

#: Linux F_SETPIPE_SZ: bigger pipes mean fewer wake-ups under load.
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
#: A frame larger than this means a corrupt stream.
MAX_FRAME = MAX_PIPE_FRAME


def open_pipe() -> tuple[int, int]:
    """Return ``(read_fd, write_fd)`` of a pipe enlarged where the OS allows."""
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_fd, write_fd


class FrameWriter:
    """Buffers frames for one pipe and writes them in as few syscalls as possible.

    ``log`` (a child's :class:`~engine.worker.report_log.ReportLog`) keeps the
    frames on disk too: at each :meth:`checkpoint`, and at the latest just
    before they go into the pipe.
    """

    __slots__ = ("blocking", "buffer", "fd", "log", "logged")

    def __init__(self, fd: int, blocking: bool, log: ReportLog | None = None) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.blocking = blocking
        self.log = log
        #: Bytes at the start of ``buffer`` already in the log.
        self.logged = 0
        os.set_blocking(fd, blocking)

    def checkpoint(self) -> None:
        """Put the frames added since the last checkpoint in the log, not yet in the pipe."""
        if self.log is not None and len(self.buffer) > self.logged:
            self.log.append(memoryview(self.buffer)[self.logged:])
            self.logged = len(self.buffer)

    def add(self, kind: int, payload: bytes) -> None:
        """Queue one frame."""
        pack_frame(self.buffer, kind, payload)

    def flush(self) -> bool:
        """Write what is buffered; True when all of it went out.

        A non-blocking writer keeps the rest for the next call. Raises OSError
        (EPIPE) when the reader is gone.
        """
        self.checkpoint()
        view = memoryview(self.buffer)
        written = 0
        try:
            while written < len(view):
                try:
                    written += os.write(self.fd, view[written:])
                except BlockingIOError:
                    break
        finally:
            view.release()
            del self.buffer[:written]
            self.logged = max(0, self.logged - written)
        return not self.buffer

    @property
    def pending(self) -> int:
        """Bytes not yet written."""
        return len(self.buffer)


class FrameReader:
    """Reassembles frames from a pipe's byte stream."""

    __slots__ = ("buffer", "eof", "fd")

    def __init__(self, fd: int, blocking: bool = False) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False
        os.set_blocking(fd, blocking)

    def read(self, size: int = PIPE_SIZE) -> list[tuple[int, bytes]]:
        """Read what the pipe holds (blocking readers wait for some) and return whole frames."""
        try:
            chunk = os.read(self.fd, size)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            self.eof = True
        elif chunk:
            self.buffer += chunk
        return self.frames()

    def frames(self) -> list[tuple[int, bytes]]:
        """Split off the complete frames buffered so far."""
        out, offset = split_frames(self.buffer)
        if offset:
            del self.buffer[:offset]
        return out

