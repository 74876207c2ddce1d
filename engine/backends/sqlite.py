"""The embedded database backend: ``sqlite:///path/to/results.db``.

WAL mode lets every worker on a host write and any process read at once.
Workers write in batches (one transaction per recorder flush), so storing
results costs little throughput. The table keeps one final state per task
id: a late or duplicate non-final state never overwrites a final one, and a
final state is replaced only by a stronger one (SUCCESS over FAILURE), the
rule of the core's recorder. Readers poll with backoff; the Tasks guide
warns that polling a database is expensive, so ``wait_for`` starts at 1 ms
and backs off to ``interval``.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from engine import states
from engine.backends.base import FIRER_TTL, Backend
from engine.core import StateRecord, records_from_rows
from engine.exceptions import ImproperlyConfigured
from engine.utils import process

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("SQLiteBackend",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS engine_results (
    task_id   TEXT PRIMARY KEY,
    state     TEXT NOT NULL,
    ready     INTEGER NOT NULL,
    strength  INTEGER NOT NULL,
    result    BLOB,
    traceback TEXT,
    date_done REAL NOT NULL
)
"""
#: ``fired``: 0 until the last header task is counted, 1 while its counter sends the body
#: (``firer`` names it), 2 once the body is queued durably.
CHORD_SCHEMA = """
CREATE TABLE IF NOT EXISTS engine_chords (
    chord_id TEXT PRIMARY KEY, size INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0,
    fired INTEGER NOT NULL DEFAULT 0, header BLOB NOT NULL, body BLOB NOT NULL, created REAL NOT NULL,
    firer TEXT);
CREATE TABLE IF NOT EXISTS engine_chord_parts (chord_id TEXT NOT NULL, task_id TEXT NOT NULL,
    PRIMARY KEY (chord_id, task_id));
CREATE TABLE IF NOT EXISTS engine_chord_firers (firer TEXT PRIMARY KEY, seen REAL NOT NULL);
"""
#: Seconds between two looks at the commit counter while waiting for results (first, and at most).
CHANGE_CHECK = 0.0005
CHANGE_CHECK_MAX = 0.005
#: Seconds a new connection keeps trying when another one is setting up the same file.
OPEN_TIMEOUT = 30.0
#: Ids read by one query of a bulk read (below SQLite's smallest limit of bound parameters, 999).
READ_MANY = 900
INDEX = "CREATE INDEX IF NOT EXISTS engine_results_date_done ON engine_results (date_done)"
UPSERT = """
INSERT INTO engine_results (task_id, state, ready, strength, result, traceback, date_done)
VALUES (?, ?, ?, ?, ?, NULLIF(?, ''), ?)
ON CONFLICT (task_id) DO UPDATE SET
    state = excluded.state, ready = excluded.ready, strength = excluded.strength,
    result = excluded.result, traceback = excluded.traceback, date_done = excluded.date_done
WHERE engine_results.ready = 0 OR (excluded.ready = 1 AND excluded.strength < engine_results.strength)
"""


class SQLiteBackend(Backend):
    """Results in one SQLite file shared by every process on the host."""

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        super().__init__(url, app)
        path = (url or "").partition("://")[2]
        path = path.removeprefix("/")  # sqlite:///relative.db and sqlite:////abs/path.db, as SQLAlchemy reads them
        if not path:
            raise ImproperlyConfigured(f"sqlite backend URL needs a path: sqlite:///results.db, got {url!r}")
        self.path = path
        self._local = threading.local()
        expires = app.conf.result_expires if app is not None else 86400
        if isinstance(expires, datetime.timedelta):
            expires = expires.total_seconds()
        #: Seconds a result is kept; None keeps results forever (``result_expires`` 0 or None, as in Redis).
        self.expires = float(expires) if expires else None

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != process.pid():
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            deadline = time.monotonic() + OPEN_TIMEOUT
            try:
                while True:
                    try:
                        self._prepare(connection)
                        break
                    except sqlite3.OperationalError as exc:
                        # Setting WAL mode, or a schema change, meeting another process doing the same
                        # on a new file fails at once ("database is locked"): sqlite's busy wait does
                        # not cover it. Try again for a while.
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
            except BaseException:
                connection.close()
                raise
            local.connection, local.pid = connection, process.pid()
        opened: sqlite3.Connection = local.connection
        return opened

    @staticmethod
    def _prepare(connection: sqlite3.Connection) -> None:
        """WAL mode and the tables, on a new connection (each step does nothing when done already)."""
        # Switching to WAL needs a lock: only a file not in WAL mode yet (the mode stays with the file).
        if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(SCHEMA)
        connection.execute(INDEX)
        connection.executescript(CHORD_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(engine_chords)")}
        if "firer" not in columns:  # a file made by an earlier version
            try:
                connection.execute("ALTER TABLE engine_chords ADD COLUMN firer TEXT")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it just now
                    raise
        # Chords being fired are few at any time: looking for abandoned ones reads only those.
        connection.execute("CREATE INDEX IF NOT EXISTS engine_chords_being_fired ON engine_chords (firer) "
                           "WHERE fired = 1")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside ``BEGIN IMMEDIATE``: committed at the end, rolled back on an error."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def store(self, records: Iterable[StateRecord]) -> None:
        # Python's sqlite3 binds str, int, float and bytearray as they are, but looks every bytes
        # and None value up in its adapter registry first, which costs more than the rest of the
        # row: the result goes as a bytearray (a BLOB all the same) and no traceback as '' (NULLIF,
        # so an empty traceback reads back as None, as no traceback).
        # Once per result stored: states.precedence() inlined, the clock read once per batch.
        ready, strength, now = states.READY_STATES, states.PRECEDENCE_INDEX.get, time.time()
        rows = [(r.task_id, r.state, int(r.state in ready), strength(r.state, states.CUSTOM_PRECEDENCE),
                 bytearray(r.result) if type(r.result) is bytes else r.result, r.traceback or "",
                 r.timestamp or now) for r in records]
        if not rows:
            return
        with self._transaction() as connection:
            connection.executemany(UPSERT, rows)

    def _change_token(self) -> int:
        # SQLite's counter of commits by other connections: reading it costs no table read.
        version: int = self._connection().execute("PRAGMA data_version").fetchone()[0]
        return version

    def _wait_for_change(self, seconds: float, token: Any) -> None:
        """Sleep in short steps until another connection committed (or ``seconds`` passed)."""
        end = time.monotonic() + seconds
        step = CHANGE_CHECK
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(step, remaining))
            if self._change_token() != token:
                return
            step = min(step * 1.5, CHANGE_CHECK_MAX)  # a quiet store is looked at less often

    def get_encoded(self, task_id: str) -> StateRecord | None:
        row = self._connection().execute(
            "SELECT state, result, traceback, date_done FROM engine_results WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        return StateRecord(task_id, row[0], row[1], row[2], row[3])

    supports_chords = True

    def chord_start(self, chord_id: str, header_ids: list[str], body: dict) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO engine_chords (chord_id, size, header, body, created) VALUES (?, ?, ?, ?, ?)",
            (chord_id, len(header_ids), msgpack.packb(header_ids), msgpack.packb(body, use_bin_type=True),
             time.time()))

    def chord_parts_done(self, parts: list[tuple[str, str]],
                         firer: str | None = None) -> list[tuple[str, list[str], dict]]:
        """One transaction: a part counts once (its row), and the flag of a completed chord is set once.

        The parts are counted per chord, with one insert of all its task ids and
        one update of its count, not a statement per part.
        """
        by_chord: dict[str, list[str]] = {}
        for chord_id, task_id in parts:
            by_chord.setdefault(chord_id, []).append(task_id)
        completed = []
        with self._transaction() as connection:
            for chord_id, task_ids in by_chord.items():
                # A header task that ran twice (at-least-once) is in the table already: not counted again.
                inserted = connection.executemany("INSERT OR IGNORE INTO engine_chord_parts VALUES (?, ?)",
                                                  [(chord_id, task_id) for task_id in task_ids]).rowcount
                if not inserted:
                    continue
                connection.execute("UPDATE engine_chords SET done = done + ? WHERE chord_id = ?", (inserted, chord_id))
                fired = connection.execute(
                    "UPDATE engine_chords SET fired = 1, firer = ? WHERE chord_id = ? AND fired = 0 AND done >= size",
                    (firer, chord_id)).rowcount
                if fired:
                    completed += connection.execute(
                        "SELECT chord_id, header, body FROM engine_chords WHERE chord_id = ?", (chord_id,)).fetchall()
        return _chords(completed)

    def chord_bodies_queued(self, chord_ids: list[str], firer: str) -> None:
        self._connection().executemany("UPDATE engine_chords SET fired = 2 WHERE chord_id = ? AND firer = ?",
                                       [(chord_id, firer) for chord_id in chord_ids])

    def chords_firing(self, firer: str) -> list[tuple[str, list[str], dict]]:
        return _chords(self._connection().execute(
            "SELECT chord_id, header, body FROM engine_chords WHERE fired = 1 AND firer = ?", (firer,)).fetchall())

    def firer_alive(self, firer: str) -> None:
        self._connection().execute(
            "INSERT INTO engine_chord_firers VALUES (?, ?) ON CONFLICT (firer) DO UPDATE SET seen = excluded.seen",
            (firer, time.time()))

    def chords_take_over(self, from_firer: str, firer: str) -> list[tuple[str, list[str], dict]]:
        return self._take_over("c.firer = ?", (from_firer,), firer)

    def chords_abandoned(self, firer: str) -> list[tuple[str, list[str], dict]]:
        """One transaction: the chords of silent firers are read and given to ``firer`` together."""
        return self._take_over("c.firer IN (SELECT firer FROM engine_chord_firers WHERE seen < ? AND firer != ?)",
                               (time.time() - FIRER_TTL, firer), firer)

    def _take_over(self, which: str, params: tuple, firer: str) -> list[tuple[str, list[str], dict]]:
        """The chords being fired that ``which`` (a condition on ``c``) picks, noted as fired by ``firer``."""
        with self._transaction() as connection:
            rows = connection.execute(f"SELECT c.chord_id, c.header, c.body FROM engine_chords c "
                                      f"WHERE c.fired = 1 AND {which}", params).fetchall()
            connection.executemany("UPDATE engine_chords SET firer = ? WHERE chord_id = ? AND fired = 1",
                                   [(firer, chord_id) for chord_id, _, _ in rows])
        return _chords(rows)

    def get_many_encoded(self, task_ids: Sequence[str]) -> dict[str, StateRecord]:
        """One query per :data:`READ_MANY` ids."""
        connection = self._connection()
        found: dict[str, StateRecord] = {}
        for start in range(0, len(task_ids), READ_MANY):
            chunk = task_ids[start:start + READ_MANY]
            marks = ",".join("?" * len(chunk))
            records_from_rows(connection.execute("SELECT task_id, state, result, traceback, date_done "
                                                 f"FROM engine_results WHERE task_id IN ({marks})", tuple(chunk)),
                              found)
        return found

    def forget(self, task_id: str) -> None:
        self._connection().execute("DELETE FROM engine_results WHERE task_id = ?", (task_id,))

    def forget_many(self, task_ids: Sequence[str]) -> None:
        """One transaction for all of them."""
        with self._transaction() as connection:
            connection.executemany("DELETE FROM engine_results WHERE task_id = ?", [(i,) for i in task_ids])

    def cleanup(self, now: float | None = None) -> int:
        """Delete results older than ``result_expires``; return how many."""
        if self.expires is None:
            return 0
        cutoff = (now or time.time()) - self.expires
        connection = self._connection()
        cursor = connection.execute("DELETE FROM engine_results WHERE date_done < ?", (cutoff,))
        old = "SELECT chord_id FROM engine_chords WHERE created < ?"
        connection.execute(f"DELETE FROM engine_chord_parts WHERE chord_id IN ({old})", (cutoff,))
        connection.execute("DELETE FROM engine_chords WHERE created < ?", (cutoff,))
        connection.execute("DELETE FROM engine_chord_firers WHERE seen < ?", (cutoff,))
        return cursor.rowcount

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == process.pid():
            connection.close()
        self._local = threading.local()


def _chords(rows: list) -> list[tuple[str, list[str], dict]]:
    """``(chord id, header ids, body)`` from rows of ``chord_id, header, body`` as stored."""
    return [(chord_id, msgpack.unpackb(header, raw=False), msgpack.unpackb(body, raw=False))
            for chord_id, header, body in rows]
