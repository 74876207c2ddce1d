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

import os
import re
import sqlite3
from typing import Iterable, Iterator

from engine.exceptions import ImproperlyConfigured

__all__ = ("Journal", "default_journal_path")

SCHEMA = ("CREATE TABLE IF NOT EXISTS journal (task_id TEXT PRIMARY KEY, raw BLOB NOT NULL);"
          "CREATE TABLE IF NOT EXISTS runtimes (name TEXT PRIMARY KEY, seconds REAL NOT NULL)")


def default_journal_path(endpoint: str) -> str:
    """One journal per worker endpoint, under ``$ENGINE_STATE_DIR`` (default ``~/.local/state/engine``)."""
    base = os.environ.get("ENGINE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state", "engine")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", endpoint).strip("_") or "worker"
    return os.path.join(base, f"journal-{name}.db")


class Journal:
    """Task messages a worker has accepted and not finished, on disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._added: dict[str, bytes] = {}
        self._removed: set[str] = set()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Rows live briefly (accepted, then finished): a small cache and frequent WAL
            # checkpoints keep the supervisor's memory flat.
            self._db.execute("PRAGMA cache_size=-512")
            self._db.execute("PRAGMA wal_autocheckpoint=256")
            self._db.executescript(SCHEMA)
            # Prove now that the disk takes writes: a full or read-only disk is a
            # start-up error, not a surprise at the first task.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO journal VALUES ('__probe__', x'00')")
            self._db.execute("DELETE FROM journal WHERE task_id = '__probe__'")
            self._db.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            raise ImproperlyConfigured(f"cannot write the worker journal {path!r}: {exc} "
                                       "(choose another place with --journal)") from None

    def pending(self) -> Iterator[bytes]:
        """The raw messages left by an earlier run, oldest first."""
        for (raw,) in self._db.execute("SELECT raw FROM journal ORDER BY rowid"):
            yield bytes(raw)

    def add(self, task_id: str, raw: bytes) -> None:
        """Note an accepted message (written by the next :meth:`commit`)."""
        self._removed.discard(task_id)
        self._added[task_id] = raw

    def remove(self, task_ids: Iterable[str]) -> None:
        """Note finished tasks (removed by the next :meth:`commit`)."""
        for task_id in task_ids:
            if self._added.pop(task_id, None) is None:
                self._removed.add(task_id)

    @property
    def dirty(self) -> bool:
        """True when there is something to commit."""
        return bool(self._added or self._removed)

    def commit(self) -> None:
        """Write what was added and removed since the last commit, in one transaction."""
        if not self.dirty:
            return
        added, removed = self._added, self._removed
        self._added, self._removed = {}, set()
        db = self._db
        db.execute("BEGIN")
        try:
            if added:
                db.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?)", added.items())
            if removed:
                db.executemany("DELETE FROM journal WHERE task_id = ?", ((task_id,) for task_id in removed))
        except BaseException:
            db.execute("ROLLBACK")
            self._added.update(added)
            self._removed |= removed
            raise
        db.execute("COMMIT")

    def runtimes(self) -> dict[str, float]:
        """The average run time per task name saved by :meth:`save_runtimes` (an earlier run's)."""
        return {name: float(seconds) for name, seconds in self._db.execute("SELECT name, seconds FROM runtimes")}

    def save_runtimes(self, by_name: dict[str, float]) -> None:
        """Replace the saved run times with ``by_name`` (one transaction)."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM runtimes")
            db.executemany("INSERT INTO runtimes VALUES (?, ?)", by_name.items())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Commit and close."""
        try:
            self.commit()
        finally:
            self._db.close()
