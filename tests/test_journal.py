"""The worker journal: one worker per file, a default path per worker identity, commits all or nothing."""

from __future__ import annotations

import os
import select
import signal
import sqlite3

import pytest

from engine.exceptions import ImproperlyConfigured
from engine.utils.hostname import HOSTNAME
from engine.worker.journal import Journal, default_journal_path
from tests import workerapp
from tests.worker_helpers import free_endpoint, wait_until


def rows(path):
    """What another process reading the file sees."""
    db = sqlite3.connect(path)
    try:
        return {task_id: bytes(raw) for task_id, raw in db.execute("SELECT task_id, raw FROM journal")}
    finally:
        db.close()


# --- default path --------------------------------------------------------------------


def test_default_path_is_keyed_by_worker_name_and_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_STATE_DIR", str(tmp_path))
    endpoint = "tcp://127.0.0.1:5555"
    unnamed = default_journal_path(None, endpoint)
    assert os.path.dirname(unnamed) == str(tmp_path)
    assert unnamed == default_journal_path(None, endpoint)  # stable across restarts (no pid in it)
    assert unnamed == default_journal_path(f"engine@{HOSTNAME}", endpoint)
    assert f"engine@{HOSTNAME}" in os.path.basename(unnamed)
    paths = {unnamed, default_journal_path(None, "tcp://127.0.0.1:5556"), default_journal_path("w1", endpoint),
             default_journal_path("w2", endpoint), default_journal_path("w/1", endpoint),
             default_journal_path("w_1", endpoint)}
    assert len(paths) == 6
    long_name = default_journal_path("x" * 1000, endpoint)
    assert len(os.path.basename(long_name)) < 255


def test_the_supervisor_keys_its_default_journal_on_the_name_given(monkeypatch, tmp_path):
    from engine.worker.supervisor import Supervisor

    monkeypatch.setenv("ENGINE_STATE_DIR", str(tmp_path))
    app = workerapp.app
    unnamed = [Supervisor(app, concurrency=1, binds=["tcp://127.0.0.1:7001"]) for _ in range(2)]
    assert unnamed[0].hostname.endswith(f"-{os.getpid()}")  # unique among live workers
    assert unnamed[0].journal_path == default_journal_path(None, "tcp://127.0.0.1:7001")
    named = Supervisor(app, concurrency=1, binds=["tcp://127.0.0.1:7001"], hostname="w1@host")
    assert named.journal_path == default_journal_path("w1@host", "tcp://127.0.0.1:7001")
    connecting = Supervisor(app, concurrency=1, connects=["tcp://127.0.0.1:7002"], hostname="w2@host")
    assert connecting.journal_path == default_journal_path("w2@host", "tcp://127.0.0.1:7002")


# --- one worker per journal -------------------------------------------------------------


def test_a_frame_keeps_its_sender_and_an_older_journal_gains_the_column(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as db:  # a journal written before frames kept their sender
        db.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
        db.execute("INSERT INTO frames VALUES (1, x'90')")
    journal = Journal(path)
    try:
        frame = journal.add_frame(b"\x90", 1, b"client-1")
        journal.add_frame(b"\x90", 1)  # from no client: nothing to acknowledge later
        journal.commit()
        assert journal.frame_senders() == {frame: b"client-1"}
    finally:
        journal.close()


def test_a_journal_held_by_another_journal_object_is_refused(tmp_path):
    path = str(tmp_path / "j.db")
    first = Journal(path)
    try:
        with pytest.raises(ImproperlyConfigured) as info:
            Journal(path)
        message = str(info.value)
        assert path in message and f"pid {os.getpid()}" in message
        assert "-n NAME" in message and "--journal PATH" in message
    finally:
        first.close()
    Journal(path).close()  # closing released it


def test_a_forked_child_does_not_keep_the_journal_locked(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    release_r, release_w = os.pipe()
    forked_r, forked_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a pool child: lives on while its supervisor closes the journal
        try:
            os.close(release_w)
            os.write(forked_w, b"x")  # fork() returned here: the at-fork handlers ran
            os.read(release_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(release_r)
        os.close(forked_w)
        assert select.select([forked_r], [], [], 10)[0], "the child did not start"
        os.close(forked_r)
        journal.close()
        Journal(path).close()
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


def test_a_journal_that_cannot_be_created_is_still_a_clear_error(tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    with pytest.raises(ImproperlyConfigured, match="cannot write the worker journal"):
        Journal(str(not_a_directory / "j.db"))


# --- commits ---------------------------------------------------------------------------


class FailingStatement:
    """The journal's connection, except that one SQL statement fails (a full disk, an I/O error)."""

    def __init__(self, db, statement):
        self.db, self.statement = db, statement

    def execute(self, sql, *args):
        if sql == self.statement:
            raise sqlite3.OperationalError(f"{sql} failed (forced by the test)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.mark.parametrize("statement", ["BEGIN", "COMMIT"])
def test_a_failed_commit_keeps_its_changes_for_the_next_and_leaves_the_file_as_it_was(tmp_path, statement):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    try:
        journal.add("a:0", b"A")
        journal.add("b:0", b"B")
        journal.commit()
        journal.add("c:0", b"C")
        journal.remove(["a:0"])
        real = journal._db
        journal._db = FailingStatement(real, statement)
        with pytest.raises(sqlite3.OperationalError, match="forced"):
            journal.commit()
        journal._db = real
        assert journal.dirty
        assert rows(path) == {"a:0": b"A", "b:0": b"B"}  # nothing of the failed batch
        assert not real.in_transaction
        journal.commit()
        assert not journal.dirty
        assert rows(path) == {"b:0": b"B", "c:0": b"C"}
    finally:
        journal.close()


def test_a_commit_that_finds_the_file_locked_keeps_its_changes(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        journal.add("a:0", b"A")
        journal.commit()
        journal._db.execute("PRAGMA busy_timeout=0")
        other.execute("BEGIN IMMEDIATE")  # another writer holds the file
        journal.add("b:0", b"B")
        journal.remove(["a:0"])
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            journal.commit()
        other.execute("ROLLBACK")
        assert journal.dirty
        journal.commit()
        assert rows(path) == {"b:0": b"B"}
    finally:
        other.close()
        journal.close()


def test_a_failed_save_of_run_times_leaves_the_journal_usable(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    try:
        journal.save_runtimes({"a": 1.0})
        real = journal._db
        journal._db = FailingStatement(real, "COMMIT")
        with pytest.raises(sqlite3.OperationalError):
            journal.save_runtimes({"b": 2.0})
        journal._db = real
        assert journal.runtimes() == {"a": 1.0}
        journal.add("x:0", b"X")
        journal.commit()
        assert rows(path) == {"x:0": b"X"}
    finally:
        journal.close()


# --- real workers ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_worker_on_the_same_journal_exits_1_naming_it(worker_setup, tmp_path):
    journal = str(tmp_path / "shared.db")
    first = worker_setup("--concurrency", "1", "--journal", journal)
    second = worker_setup("--concurrency", "1", "--journal", journal, "--bind", free_endpoint(), ready=False)
    assert second.proc.wait(30) == 1
    assert f"the worker journal {journal!r} is in use by another worker (pid {first.pid})" in second.output
    assert "-n NAME" in second.output and "--journal PATH" in second.output
    assert "Traceback" not in second.output
    assert first.proc.poll() is None
    assert workerapp.add.delay(1, 2).get(timeout=20) == 3  # the first one still serves


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_unnamed_workers_connecting_to_one_client_do_not_share_a_journal(worker_setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    endpoint = free_endpoint()
    workerapp.app.close()
    workerapp.app.conf.update(transport=endpoint, transport_bind=True)
    first = worker_setup("--concurrency", "1", "--connect", endpoint, extra_env=state)
    second = worker_setup("--concurrency", "1", "--connect", endpoint, extra_env=state, ready=False)
    assert second.proc.wait(30) == 1  # the same identity (engine@HOST, one endpoint): refused
    assert "is in use by another worker" in second.output
    named = [worker_setup("--concurrency", "1", "--connect", endpoint, "-n", f"w{i}@test", extra_env=state)
             for i in (1, 2)]
    journals = {w.wait_for_line("journal:").split("journal:")[1].strip() for w in (first, *named)}
    assert len(journals) == 3
    assert [r.get(timeout=20) for r in [workerapp.add.delay(i, 0) for i in range(30)]] == list(range(30))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_restarted_unnamed_worker_replays_its_own_journal(worker_setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = worker_setup("--concurrency", "1", extra_env=state)
    result = workerapp.add.apply_async((40, 2), countdown=3)
    path = worker.wait_for_line("journal:").split("journal:")[1].strip()
    wait_until(lambda: rows(path), 20, message="the worker journaled the task")
    os.kill(worker.pid, signal.SIGKILL)  # the lock goes with the process
    worker.proc.wait(10)
    restarted = worker_setup("--concurrency", "1", extra_env=state)
    assert result.get(timeout=30) == 42
    assert "replaying 1 task(s)" in restarted.output


# --- batch frames: one row per received frame ----------------------------------------------


def _frame(*ids: str) -> tuple[bytes, list[bytes]]:
    from engine.core import TaskMessage, encode_batch, encode_message

    messages = [TaskMessage(task_id, "t.add", (1, 2)) for task_id in ids]
    return encode_batch(messages), [encode_message(m) for m in messages]


def _rows(path: str, table: str) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_frame_is_one_row_until_its_last_task_is_final_and_replays_whole(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    frame, raws = _frame("a", "b", "c")
    ref = journal.add_frame(frame, len(raws))
    journal.commit()
    assert (_rows(path, "frames"), _rows(path, "journal")) == (1, 0)

    journal.remove([ref, ref])  # two of its three tasks are final
    journal.commit()
    assert _rows(path, "frames") == 1
    journal.close()

    # A restart replays every task of the frame (at-least-once), known by the frame's ref.
    again = Journal(path)
    assert list(again.pending()) == [(ref, raw) for raw in raws]
    again.remove([ref, ref, ref])
    again.commit()
    assert _rows(path, "frames") == 0
    assert again.add_frame(frame, 3) > ref  # ids are never reused
    again.close()


def test_a_frame_whose_tasks_all_finish_before_the_commit_is_never_written(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    frame, raws = _frame("a", "b")
    ref = journal.add_frame(frame, 2)
    journal.remove([ref, ref])
    assert not journal.dirty
    journal.close()
    assert _rows(path, "frames") == 0


def test_rows_of_their_own_and_frames_replay_together(tmp_path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    frame, raws = _frame("a")
    frame_ref = journal.add_frame(frame, 1)
    own_ref = journal.add("b:0", b"raw-b")
    journal.close()
    assert list(Journal(path).pending()) == [(frame_ref, raws[0]), (own_ref, b"raw-b")]


def test_a_countdown_task_from_a_frame_gets_its_own_row_so_the_frame_can_go(tmp_path):
    import time

    from engine import Engine
    from engine.worker.supervisor import Supervisor, _journal_key

    app = Engine("j", backend="memory://", set_as_current=False)

    @app.task(name="t.add")
    def add(x, y):
        return x + y

    sup = Supervisor(app, concurrency=1, journal=str(tmp_path / "j.db"), hostname="w@test")
    sup.journal = sup.states.journal = Journal(sup.journal_path)
    try:
        now_msg = add.build_message((1, 2))
        later_msg = add.build_message((3, 4), eta=time.time() + 3600)
        from engine.core import encode_batch, encode_message

        frame = encode_batch([now_msg, later_msg])
        ref = sup.journal.add_frame(frame, 2)
        sup.accept(now_msg, encode_message(now_msg), journal_ref=ref)
        sup.accept(later_msg, encode_message(later_msg), journal_ref=ref)
        [held] = sup.timers.pop_due(time.time() + 7200)
        assert held.journal_ref == _journal_key(later_msg)
        sup.journal.remove([ref])  # the task that ran now is final: the frame goes
        sup.journal.commit()
        assert (_rows(sup.journal_path, "frames"), _rows(sup.journal_path, "journal")) == (0, 1)
    finally:
        sup.journal.close()


def test_a_countdown_task_whose_frame_row_stayed_is_replayed_once(tmp_path):
    import time

    from engine import Engine
    from engine.core import encode_batch, encode_message
    from engine.worker.supervisor import Supervisor

    app = Engine("j", backend="memory://", set_as_current=False)

    @app.task(name="t.add")
    def add(x, y):
        return x + y

    def supervisor() -> Supervisor:
        sup = Supervisor(app, concurrency=1, journal=str(tmp_path / "j.db"), hostname="w@test")
        sup.journal = sup.states.journal = Journal(sup.journal_path)
        return sup

    first = supervisor()
    now_msg, later_msg = add.build_message((1, 2)), add.build_message((3, 4), eta=time.time() + 3600)
    ref = first.journal.add_frame(encode_batch([now_msg, later_msg]), 2)
    first.accept(now_msg, encode_message(now_msg), journal_ref=ref)
    first.accept(later_msg, encode_message(later_msg), journal_ref=ref)
    first.journal.close()  # killed: the frame row stays (its first task never finished), and the countdown's own row

    again = supervisor()
    try:
        again._replay()
        assert len(again.timers) == 1 and len(again.scheduler) == 1  # the countdown task once, not twice
    finally:
        again.journal.close()
