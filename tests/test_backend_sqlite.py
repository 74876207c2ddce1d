"""The SQLite backend: cross-process reads, state precedence, forget, expiry."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from engine import Engine, states
from engine.core import StateRecord
from engine.exceptions import RemoteTaskError


@pytest.fixture
def app(tmp_path):
    application = Engine("t", backend=f"sqlite:///{tmp_path / 'r.db'}")
    yield application
    application.close()


@pytest.mark.slow
def test_results_are_readable_from_another_process(app, tmp_path):
    app.backend.store_state("x1", states.SUCCESS, {"answer": [1, 2]})
    code = (f"from engine import Engine; a = Engine('o', backend='sqlite:///{tmp_path / 'r.db'}'); "
            "print(a.AsyncResult('x1').get(timeout=5))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "{'answer': [1, 2]}", out.stderr


def test_a_final_state_is_never_overwritten_by_a_late_one(app):
    backend = app.backend
    backend.store_state("t", states.SUCCESS, 1)
    backend.store_state("t", states.STARTED, None)
    backend.store_state("t", states.FAILURE, ValueError("late"))
    assert app.AsyncResult("t").state == states.SUCCESS
    backend.store_state("u", states.FAILURE, ValueError("first"))
    backend.store_state("u", states.SUCCESS, 2)
    assert app.AsyncResult("u").get(timeout=1) == 2


def test_stored_rows_keep_their_bytes_and_a_missing_traceback_or_result_reads_back_none(app):
    backend = app.backend
    backend.store([StateRecord("a", states.SUCCESS, b"\x93\x01\x02\x03", None, 1.5),
                   StateRecord("b", states.FAILURE, b"\xc0", "Traceback: boom", 2.5),
                   StateRecord("c", states.STARTED, None, None, 3.5)])
    a, b, c = (backend.get_encoded(task_id) for task_id in "abc")
    assert (a.state, a.result, a.traceback, a.timestamp) == (states.SUCCESS, b"\x93\x01\x02\x03", None, 1.5)
    assert type(a.result) is bytes  # stored as a BLOB, read as bytes
    assert (b.result, b.traceback) == (b"\xc0", "Traceback: boom")
    assert (c.state, c.result, c.traceback) == (states.STARTED, None, None)


def test_custom_exceptions_round_trip_or_become_a_clear_stand_in(app):
    class LocalError(Exception):
        pass

    app.backend.store_state("e1", states.FAILURE, KeyError("k"), "tb text")
    with pytest.raises(KeyError):
        app.AsyncResult("e1").get(timeout=1)
    assert app.AsyncResult("e1").traceback == "tb text"
    app.backend.store_state("e2", states.FAILURE, LocalError("nope"))  # a class nobody can import by name
    error = app.AsyncResult("e2").result
    assert isinstance(error, (LocalError, RemoteTaskError))


def test_forget_and_cleanup_of_expired_results(app):
    app.backend.store_state("f", states.SUCCESS, 1)
    app.AsyncResult("f").forget()
    assert app.AsyncResult("f").state == states.PENDING
    app.backend.store_state("old", states.SUCCESS, 1)
    assert app.backend.cleanup(now=time.time() + app.conf.result_expires + 1) == 1
    assert app.AsyncResult("old").state == states.PENDING


def test_custom_state_meta_is_visible(app):
    app.backend.store_state("p", "PROGRESS", {"done": 3})
    result = app.AsyncResult("p")
    assert (result.state, result.info, result.ready()) == ("PROGRESS", {"done": 3}, False)



def test_processes_and_threads_opening_a_new_store_at_once_all_get_it(tmp_path):
    # A worker's supervisor, its state writer and a client waiting on results may all open a
    # file that does not exist yet at the same moment: none may fail with "database is locked".
    import threading

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    errors = []
    start = threading.Barrier(8)

    def open_and_store(n: int) -> None:
        backend = Engine(f"opener{n}", backend=url, set_as_current=False).backend
        start.wait(10)
        try:
            backend.store([StateRecord(f"t{n}", states.SUCCESS, b"\x01", None, time.time())])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_store, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    reader = Engine("reader", backend=url, set_as_current=False).backend
    assert len(reader.get_many_encoded([f"t{n}" for n in range(8)])) == 8
