"""What children reported, kept beside the journal until their supervisor has stored it: fewer tasks run twice.

A supervisor that is killed (SIGKILL, the OOM killer) loses the states its
children reported and it had not written out yet (up to a flush interval),
and its children run on for the moment the kernel takes to kill them
(PR_SET_PDEATHSIG fires once the supervisor's exit is done). Its journal
still holds all those tasks, so the next run would run them again.

Each child therefore also writes every batch of reports, just before the
batch goes into its pipe, to a file of its own in ``<journal>.reports/``: a
ring of :data:`LOG_SIZE` bytes, written with ``pwrite`` and never synced
(the page cache outlives the process; after a machine crash the journal
replays, as before). Its header says where the complete frames end, and is
written after them, so a child killed in the middle of a write leaves the
frames before it readable. One write per batch, not per task: a batch is
what a busy child reports every few milliseconds.

A restarted supervisor reads the files its children left (:func:`recover`)
before it forks new ones. A task of its journal that a log shows finished
(a DONE with a final state) is not run again: the states it reported are
stored (or replied, for ``rpc://``), the messages it sent (retries, chain
steps) are accepted unless they are known already, and its journal row is
released. Tasks whose reports were still in a child's buffer when it died
run again (at-least-once). The supervisor removes a child's file when it
has read the child's pipe to the end.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from engine import states
from engine.core import decode_message, read_done
from engine.exceptions import MessageDecodeError
from engine.worker import pipe

__all__ = ("LOG_SIZE", "RecoveredTask", "ReportLog", "attempt_key", "frames_of", "log_path", "recover", "unread_tail")

logger = logging.getLogger("engine.worker")

#: Bytes of frames a child's file keeps (a ring): several seconds of reports of a busy child.
LOG_SIZE = 4 * 1024 * 1024
#: ``<magic><end of the complete frames>`` at the start of the file.
HEADER = struct.Struct("<4sQ")
MAGIC = b"ERL1"
#: A frame kind of the log only: frames are missing here (the ring wrapped, a batch was too large),
#: so the task whose frames it cuts in two is not known in full and is not recovered.
GAP = 0
_GAP_FRAME = pipe.HEADER.pack(0, GAP)


def log_path(directory: str, pid: int, number: int) -> str:
    """The report log of the ``number``-th child the supervisor ``pid`` started, in ``directory``.

    Not named by the child's pid: a pid can come back while the log of the
    child that had it waits to be removed.
    """
    return os.path.join(directory, f"{pid}-{number}.log")


class ReportLog:
    """A child's side: each batch of frames it reports, written to its file before the pipe."""

    __slots__ = ("fd", "position")

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.position = HEADER.size
        os.pwrite(self.fd, HEADER.pack(MAGIC, self.position), 0)

    def append(self, frames: bytes | bytearray | memoryview) -> None:
        """Keep ``frames`` (whole frames); a batch larger than the ring, or a failed write, is not kept."""
        if self.fd < 0:
            return
        size = len(frames)
        try:
            if size + len(_GAP_FRAME) > LOG_SIZE - HEADER.size:
                self._write(_GAP_FRAME)  # only the tasks of this batch would run again after a crash
                return
            if self.position + size > LOG_SIZE:
                # Wrap: first say "empty", so that a crash while the start is overwritten never
                # lets the old end point past the new frames; the task whose frames went before
                # the wrap is cut in two: a gap.
                self.position = HEADER.size
                os.pwrite(self.fd, HEADER.pack(MAGIC, self.position), 0)
                self._write(_GAP_FRAME)
            self._write(frames)
        except OSError as exc:  # a full disk: the log is an optimisation, the journal still guarantees
            logger.warning("child %d stops keeping its reports beside the journal: %s", os.getpid(), exc)
            self.close()

    def _write(self, frames: bytes | bytearray | memoryview) -> None:
        """Write whole frames at the end, then move the header's end past them."""
        if os.pwrite(self.fd, frames, self.position) != len(frames):
            raise OSError("short write")  # the header stays before them: nothing half written is read
        self.position += len(frames)
        os.pwrite(self.fd, HEADER.pack(MAGIC, self.position), 0)

    def close(self) -> None:
        """Close the file (it stays: the supervisor removes it once it has read the pipe)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


def attempt_key(task_id: str, attempt: int) -> str:
    """``"<task id>:<attempt>"``: one attempt of a task (a retry keeps the task's id), as the journal keys it."""
    return f"{task_id}:{attempt}"


@dataclass
class RecoveredTask:
    """An attempt of a task a child reported finished: its final state, the states it recorded, the messages it sent.

    Recovered tasks are keyed by :func:`attempt_key`. ``sends`` holds each message
    as ``(task id, attempt key, encoded message)``.
    """

    state: str
    records: list = field(default_factory=list)
    sends: list[tuple[str, str, bytes]] = field(default_factory=list)


def frames_of(path: str | Path) -> list[tuple[int, bytes]]:
    """The complete frames of one report log, gaps included (none when the file is not one, or unreadable)."""
    try:
        data = Path(path).read_bytes()
        if len(data) < HEADER.size:
            return []
        magic, end = HEADER.unpack_from(data)
        if magic != MAGIC or end > len(data):
            return []
        frames, _ = pipe.split_frames(data[HEADER.size:end])
    except (OSError, ValueError) as exc:
        logger.warning("could not read the report log %s: %s", path, exc)
        return []
    return frames


def _done(payload: bytes) -> tuple[str, str, bool, str]:
    """A DONE frame's task id, state, requeue flag and attempt key; ValueError or TypeError when malformed."""
    task_id, state, _, requeue, attempt = read_done(payload)
    return task_id, state, requeue, attempt_key(task_id, attempt)


def unread_tail(frames: list[tuple[int, bytes]], held: list[str],
                last_read: bytes | None) -> tuple[list[tuple[int, bytes]], int]:
    """What a dead child's log says of the tasks its supervisor still held: the frames to use, and how many ended.

    ``last_read`` is the payload of the last DONE the supervisor read from the
    child's pipe (None: none yet); ``held`` the attempt keys of the tasks it
    holds, in the order given. The frames after ``last_read`` are used through
    the last DONE that ends the held tasks in that order; a gap (frames
    missing) or a malformed DONE ends them. The pipe is one stream, so nothing
    after the first held task's frames was read; of its own frames some may
    have been. Those are RECORDs (recorded again, no harm) unless it sent
    messages (they would be sent twice): then nothing is used. Tied to
    ``last_read``, an older DONE of the same task (requeued, or sent twice) is
    never taken for this run's.
    """
    start = 0
    if last_read is not None:
        found = [index for index, (kind, payload) in enumerate(frames) if kind == pipe.DONE and payload == last_read]
        if not found:
            return [], 0
        start = found[-1] + 1
    ended = used = 0
    for index in range(start, len(frames)):
        kind, payload = frames[index]
        if kind == GAP or (kind == pipe.SEND and not ended):
            break  # frames missing from here; or messages the first held task sent may have been read
        if kind == pipe.DONE:
            try:
                key = _done(payload)[3]
            except (ValueError, TypeError):
                break
            if ended >= len(held) or key != held[ended]:
                break  # not the order it was given them in: use nothing of this task's frames, nor after
            ended += 1
            used = index + 1
    return frames[start:used], ended


def recover(directory: str) -> dict[str, RecoveredTask]:
    """The task attempts the logs in ``directory`` show finished, by :func:`attempt_key`; the logs are removed.

    A DONE with a final state (not a requeue) closes a task: the RECORD and
    SEND frames since the child's previous DONE are that task's. A gap
    (frames missing) makes the next DONE's task unknown in full: skipped.
    """
    found: dict[str, RecoveredTask] = {}
    folder = Path(directory)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.log")):
        records: list = []
        sends: list[tuple[str, str, bytes]] = []
        whole = True  # the frames since the last DONE are all there
        for kind, payload in frames_of(path):
            try:
                if kind == pipe.RECORD:
                    records.append(msgpack.unpackb(payload, raw=False))
                elif kind == pipe.SEND:
                    message = decode_message(payload)
                    sends.append((message.id, attempt_key(message.id, message.retries), payload))
                elif kind == GAP:
                    records, sends, whole = [], [], False
                elif kind == pipe.DONE:
                    _, state, requeue, key = _done(payload)
                    if whole and state in states.READY_STATES and not requeue:
                        found[key] = RecoveredTask(state, records, sends)
                    records, sends, whole = [], [], True
            except (ValueError, TypeError, MessageDecodeError) as exc:  # msgpack's errors are ValueErrors
                logger.warning("skipping a malformed frame in the report log %s: %s", path, exc)
                records, sends, whole = [], [], False
        try:
            path.unlink()
        except OSError:
            pass
    return found
