"""The worker's journal: accepted task messages survive a crash of the supervisor.

Before a worker acknowledges a batch of task messages to their clients it
writes them to a local SQLite file (WAL, one transaction per batch). A task
leaves the journal once its final state has been written to the result
backend (or, with no backend, once it ran). When a worker starts, it replays
what its journal still holds — tasks it had accepted but not finished when it
was killed, ETA/countdown tasks and retries waiting for their time included.

This is at-least-once delivery: a task that ran but whose removal from the
journal did not reach the disk runs again after a restart. Idempotent tasks
are the user's side of the bargain.

The same file keeps the worker's average run time per task name, so a
restarted ``--fair`` worker knows its long and short kinds from the first task
instead of learning them again (see :mod:`engine.worker.scheduler`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
import weakref
from collections.abc import Iterable, Iterator
from typing import Union

from engine.core import split_batch
from engine.exceptions import ImproperlyConfigured, MessageDecodeError
from engine.utils.hostname import HOSTNAME

__all__ = ("Journal", "default_journal_path")

SCHEMA = ("CREATE TABLE IF NOT EXISTS journal (task_id TEXT PRIMARY KEY, raw BLOB NOT NULL);"
          "CREATE TABLE IF NOT EXISTS frames (id INTEGER PRIMARY KEY, raw BLOB NOT NULL, sender BLOB);"
          "CREATE TABLE IF NOT EXISTS runtimes (name TEXT PRIMARY KEY, seconds REAL NOT NULL);"
          "CREATE TABLE IF NOT EXISTS revoked (id TEXT PRIMARY KEY, expires REAL NOT NULL)")

#: How the journal knows an accepted task: its own row's key (a ``str``), or the id of the
#: received batch frame it came in (an ``int``), whose row goes once all its tasks are final.
JournalRef = Union[str, int]

#: Longest file name part taken from a worker's name and endpoint (file systems allow 255 bytes).
MAX_NAME = 160


def default_journal_path(name: str | None, endpoint: str) -> str:
    """The journal of the worker called ``name`` on ``endpoint`` (its first), under ``$ENGINE_STATE_DIR``.

    ``name`` is the worker's ``-n`` name, or None for the default ``engine@HOST``: a
    name that stays the same when the worker restarts, so it finds its own journal
    again (the default worker name, ``engine@HOST-PID``, does not). With the endpoint,
    two unnamed workers binding different ports keep separate journals; two that would
    share one (both ``--connect`` to one client) are refused by the journal's lock.
    The default directory is ``~/.local/state/engine``.
    """
    base = os.environ.get("ENGINE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state", "engine")
    identity = f"{name or f'engine@{HOSTNAME}'} {endpoint}"
    readable = re.sub(r"[^A-Za-z0-9_.@-]+", "_", identity).strip("_")[:MAX_NAME]
    # Characters are replaced and long names cut: the digest keeps distinct identities in distinct files.
    return os.path.join(base, f"journal-{readable}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}.db")


#: Journals open in this process, whose lock descriptors a forked child must not keep.
_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    # A pool child inherits the supervisor's lock descriptor; closing the child's copy
    # leaves the supervisor's lock in place, and a child that outlives its supervisor
    # (it should not: PR_SET_PDEATHSIG) cannot keep the next worker out.
    for journal in list(_open_journals):
        if journal._lock_fd >= 0:
            try:
                os.close(journal._lock_fd)
            except OSError:
                pass
            journal._lock_fd = -1
    _open_journals.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _lock(path: str) -> int:
    """Take the exclusive lock of the journal ``path`` (``path.lock``); return its descriptor.

    ``flock`` locks belong to the open file, so the lock goes when the journal closes
    it or when the process dies, however it dies. A sidecar file, because SQLite's
    own POSIX locks on the database are dropped when the process closes any
    descriptor of that file.
    """
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise ImproperlyConfigured(
            f"the worker journal {path!r} is in use by another worker{pid}: give each worker on this host "
            "its own name (-n NAME) or its own journal (--journal PATH)") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Journal:
    """Task messages a worker has accepted and not finished, on disk.

    A batch frame received from a client is written as it came, one row for
    all its tasks (:meth:`add_frame`), and removed when the last of them is
    final: one insert and one delete per frame instead of per task. A task a
    worker queues itself (a retry, a chain step sent from a task) and a task
    held for a later time get rows of their own (:meth:`add`). A restart
    replays every task of a frame that still has a row, so a task of it that
    had finished runs again (at-least-once, as everywhere here).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._added: dict[str, bytes] = {}
        self._removed: set[str] = set()
        self._frames_added: dict[int, tuple[bytes, bytes | None]] = {}
        self._frames_removed: set[int] = set()
        #: Frame id -> tasks of it not final yet.
        self._frame_left: dict[int, int] = {}
        self._next_frame = 1
        #: Commits that wrote something (what was added before one of them is on disk).
        self.commits = 0
        self._lock_fd = -1
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # One worker per journal: a second one would replay the first one's tasks.
            self._lock_fd = _lock(path)
            _open_journals.add(self)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Rows live briefly (accepted, then finished): a small cache and frequent WAL
            # checkpoints keep the supervisor's memory flat.
            self._db.execute("PRAGMA cache_size=-512")
            self._db.execute("PRAGMA wal_autocheckpoint=256")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
            if "sender" not in columns:  # a journal written before frames kept their sender
                self._db.execute("ALTER TABLE frames ADD COLUMN sender BLOB")
            # Prove now that the disk takes writes: a full or read-only disk is a
            # start-up error, not a surprise at the first task.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO journal VALUES ('__probe__', x'00')")
            self._db.execute("DELETE FROM journal WHERE task_id = '__probe__'")
            self._db.execute("COMMIT")
            (last,) = self._db.execute("SELECT max(id) FROM frames").fetchone()
            self._next_frame = (last or 0) + 1
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise ImproperlyConfigured(f"cannot write the worker journal {path!r}: {exc} "
                                       "(choose another place with --journal)") from None

    def pending(self) -> Iterator[tuple[JournalRef, bytes]]:
        """The task messages an earlier run left, with the ref each is known by now: frames first, oldest first.

        Call before anything is added: a frame's tasks count down from here.
        """
        for frame_id, frame in self._db.execute("SELECT id, raw FROM frames ORDER BY id").fetchall():
            try:
                raws = split_batch(bytes(frame))
            except MessageDecodeError:
                self._frames_removed.add(frame_id)  # unreadable: nothing in it can run again
                continue
            if not raws:
                self._frames_removed.add(frame_id)
                continue
            self._frame_left[frame_id] = len(raws)
            for raw in raws:
                yield frame_id, raw
        for task_id, raw in self._db.execute("SELECT task_id, raw FROM journal ORDER BY rowid").fetchall():
            yield str(task_id), bytes(raw)

    def frame_senders(self) -> dict[int, bytes]:
        """The sender of each frame an earlier run left (frames whose sender was noted)."""
        return {int(frame_id): bytes(sender)
                for frame_id, sender in self._db.execute("SELECT id, sender FROM frames WHERE sender IS NOT NULL")}

    def add(self, task_id: str, raw: bytes) -> str:
        """Note an accepted message as its own row (written by the next :meth:`commit`); return its ref."""
        self._removed.discard(task_id)
        self._added[task_id] = raw
        return task_id

    def add_frame(self, frame: bytes, count: int, sender: bytes | None = None) -> int:
        """Note a received batch frame of ``count`` task messages, as one row; return its ref (its id).

        ``sender`` is the routing id of the client that sent it: a restarted worker
        acknowledges the frame's tasks to that client when it hears from it again.
        """
        frame_id = self._next_frame
        self._next_frame += 1
        self._frames_added[frame_id] = (frame, sender)
        self._frame_left[frame_id] = count
        return frame_id

    def remove(self, refs: Iterable[JournalRef | None]) -> None:
        """Note finished tasks (removed by the next :meth:`commit`; a frame once its last task is final)."""
        for ref in refs:
            if isinstance(ref, int):
                left = self._frame_left.get(ref, 0)
                if left > 1:
                    self._frame_left[ref] = left - 1
                elif left == 1:
                    del self._frame_left[ref]
                    if self._frames_added.pop(ref, None) is None:
                        self._frames_removed.add(ref)
            elif ref is not None and self._added.pop(ref, None) is None:
                self._removed.add(ref)

    def frames_held(self) -> int:
        """Received frames kept because some of their tasks are not final yet."""
        return len(self._frame_left)

    @property
    def dirty(self) -> bool:
        """True when there is something to commit."""
        return bool(self._added or self._removed or self._frames_added or self._frames_removed)

    def commit(self) -> None:
        """Write what was added and removed since the last commit, in one transaction."""
        if not self.dirty:
            return
        added, removed = self._added, self._removed
        frames_added, frames_removed = self._frames_added, self._frames_removed
        self._added, self._removed = {}, set()
        self._frames_added, self._frames_removed = {}, set()
        db = self._db
        try:
            db.execute("BEGIN")
            if added:
                db.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?)", added.items())
            if removed:
                db.executemany("DELETE FROM journal WHERE task_id = ?", ((task_id,) for task_id in removed))
            if frames_added:
                db.executemany("INSERT OR REPLACE INTO frames VALUES (?, ?, ?)",
                               ((frame_id, frame, sender) for frame_id, (frame, sender) in frames_added.items()))
            if frames_removed:
                db.executemany("DELETE FROM frames WHERE id = ?", ((frame_id,) for frame_id in frames_removed))
            db.execute("COMMIT")
            self.commits += 1
        except BaseException:
            _rollback(db)
            # Nothing of this batch reached the file: all of it waits for the next commit.
            self._added, self._removed = {**added, **self._added}, removed | self._removed
            self._frames_added = {**frames_added, **self._frames_added}
            self._frames_removed = frames_removed | self._frames_removed
            raise

    def runtimes(self) -> dict[str, float]:
        """The average run time per task name saved by :meth:`save_runtimes` (an earlier run's)."""
        return {name: float(seconds) for name, seconds in self._db.execute("SELECT name, seconds FROM runtimes")}

    def save_runtimes(self, by_name: dict[str, float]) -> None:
        """Replace the saved run times with ``by_name`` (one transaction)."""
        db = self._db
        try:
            db.execute("BEGIN")
            db.execute("DELETE FROM runtimes")
            db.executemany("INSERT INTO runtimes VALUES (?, ?)", by_name.items())
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def revoked(self) -> dict[str, float]:
        """Revoked ids (task ids and ``root:`` ids) an earlier run saved, with when each expires (unix time)."""
        return {str(key): float(expires) for key, expires in self._db.execute("SELECT id, expires FROM revoked")}

    def save_revoked(self, added: dict[str, float], removed: Iterable[str] = ()) -> None:
        """Save revoked ids added (id -> expiry, unix time) and forget those ``removed``, in one transaction."""
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO revoked VALUES (?, ?)", added.items())
            db.executemany("DELETE FROM revoked WHERE id = ?", ((key,) for key in removed))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def close(self) -> None:
        """Commit, close, and release the journal for the next worker."""
        try:
            self.commit()
        finally:
            try:
                self._db.close()
            finally:
                self._unlock()

    def _unlock(self) -> None:
        _open_journals.discard(self)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction (SQLite has already ended it after some errors)."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
