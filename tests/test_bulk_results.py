"""Group results read in bulk: many ids per backend call, in order, first failure raised (issue 14, part)."""

from __future__ import annotations

import threading
import time

import pytest

from engine import Engine, states
from engine.canvas import GroupResult
from engine.core import StateRecord
from engine.exceptions import TimeoutError
from engine.serialization import dumps


@pytest.fixture(params=["memory", "sqlite", "rpc"])
def app(request, tmp_path):
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'results.db'}", "rpc": "rpc://"}[request.param]
    application = Engine("bulk", backend=url, set_as_current=False)
    if request.param == "rpc":  # no transport in these tests: listen() is not needed to read what is stored
        application.backend.listen = lambda: None
    yield application
    application.close()


def store(app, task_id: str, state: str, value) -> None:
    app.backend.store([StateRecord(task_id, state, dumps(value), "Traceback ..." if state == states.FAILURE else None,
                                   time.time())])


def test_a_mix_of_ready_pending_and_failed_ids_is_read_in_one_call(app):
    store(app, "ok", states.SUCCESS, 1)
    store(app, "bad", states.FAILURE, KeyError("x"))
    store(app, "running", states.STARTED, None)
    found = app.backend.get_many_encoded(["ok", "bad", "running", "unknown"])
    assert {task_id: record.state for task_id, record in found.items()} == \
        {"ok": states.SUCCESS, "bad": states.FAILURE, "running": states.STARTED}
    group = GroupResult([app.AsyncResult(i) for i in ("ok", "bad", "running", "unknown")])
    assert not group.ready() and not group.successful() and group.completed_count() == 1


def test_group_get_returns_results_in_order_and_raises_the_first_failure_in_order(app):
    ids = [f"t{i}" for i in range(2000)]  # more than one query's worth of ids
    for i, task_id in enumerate(reversed(ids)):
        store(app, task_id, states.SUCCESS, 1999 - i)
    group = GroupResult([app.AsyncResult(i) for i in ids])
    assert group.ready() and group.completed_count() == 2000
    assert group.get(timeout=5) == list(range(2000))

    store(app, "f1", states.FAILURE, ValueError("first"))
    store(app, "f2", states.FAILURE, KeyError("second"))
    failing = GroupResult([app.AsyncResult(i) for i in ("t0", "f1", "f2")])
    with pytest.raises(ValueError, match="first"):
        failing.get(timeout=5)
    values = failing.get(timeout=5, propagate=False)
    assert values[0] == 0 and isinstance(values[1], ValueError) and isinstance(values[2], KeyError)


def test_group_get_waits_for_late_members_and_times_out_naming_how_many(app):
    store(app, "early", states.SUCCESS, "e")
    group = GroupResult([app.AsyncResult("early"), app.AsyncResult("late")])
    timer = threading.Timer(0.2, store, (app, "late", states.SUCCESS, "l"))
    timer.start()
    try:
        assert group.get(timeout=10) == ["e", "l"]
    finally:
        timer.cancel()
        timer.join(10)  # a store still under way when the result was seen ends before the app closes
    never = GroupResult([app.AsyncResult("early"), app.AsyncResult("never-1"), app.AsyncResult("never-2")])
    with pytest.raises(TimeoutError, match="2 of 3 results were not ready"):
        never.get(timeout=0.2)


def test_as_completed_yields_results_in_the_order_they_finished(app):
    from engine import as_completed

    store(app, "second", states.SUCCESS, 2)
    app.backend.store([StateRecord("first", states.FAILURE, dumps(KeyError("x")), "Traceback ...", 1.0)])
    results = [app.AsyncResult(i) for i in ("late", "second", "first")]
    timer = threading.Timer(0.2, store, (app, "late", states.SUCCESS, 3))
    timer.start()
    try:
        order = [r.id for r in as_completed(results, timeout=10)]
    finally:
        timer.cancel()
        timer.join(10)
    assert order == ["first", "second", "late"]  # by completion time; a failure counts as finished
    group = GroupResult([app.AsyncResult("second"), app.AsyncResult("never")])
    seen = []
    with pytest.raises(TimeoutError, match="1 result"):
        for result in group.iter_ready(timeout=0.2):
            seen.append(result.id)
    assert seen == ["second"]  # what finished came out before the timeout


def test_group_get_reports_progress_to_a_callback_as_members_finish(app):
    from engine.result import EagerResult

    store(app, "a", states.SUCCESS, 1)
    store(app, "b", states.SUCCESS, 2)
    eager = EagerResult("e", 0, states.SUCCESS)
    group = GroupResult([eager, app.AsyncResult("a"), app.AsyncResult("b"), app.AsyncResult("c"),
                         app.AsyncResult("a")])  # a member listed twice finishes once
    calls = []
    timer = threading.Timer(0.2, store, (app, "c", states.SUCCESS, 3))
    timer.start()
    try:
        assert group.get(timeout=10, progress=lambda done, total: calls.append((done, total))) == [0, 1, 2, 3, 1]
    finally:
        timer.cancel()
        timer.join(10)
    assert calls[0] == (1, 4) and calls[-1] == (4, 4)  # the eager member first, then as they finish
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})  # only forward, no repeats
    assert (3, 4) in calls  # a and b were seen before c was stored


class _FakeTerminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("not a real terminal")


@pytest.mark.parametrize("terminal", [True, False])
def test_group_get_progress_bar_shows_on_a_terminal_only(app, monkeypatch, terminal):
    import io
    import sys

    for name in ("TERM", "FORCE_TERMINAL", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"):
        monkeypatch.delenv(name, raising=False)
    out = _FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    ids = [f"p{i}" for i in range(50)]
    for i, task_id in enumerate(ids):
        store(app, task_id, states.SUCCESS, i)
    assert GroupResult([app.AsyncResult(i) for i in ids]).get(timeout=10, progress=True) == list(range(50))
    written = "".join(out.parts) if terminal else out.getvalue()
    if terminal:
        assert "50/50" in written and "100%" in written
    else:
        assert written == ""  # a log file or a pipe gets no bar and no control codes


def test_waiting_on_many_reads_only_the_next_ids_not_ready_and_finishes_out_of_order(app, monkeypatch):
    from engine.backends import base

    monkeypatch.setattr(base, "WAIT_AHEAD", 10)
    ids = [f"w{i}" for i in range(35)]
    for task_id in ids[5:]:  # everything but the first five is done already
        store(app, task_id, states.SUCCESS, task_id)
    sizes = []
    real = app.backend.get_many_encoded
    monkeypatch.setattr(app.backend, "get_many_encoded", lambda wanted: sizes.append(len(wanted)) or real(wanted))
    timer = threading.Timer(0.2, lambda: [store(app, task_id, states.SUCCESS, task_id) for task_id in ids[:5]])
    timer.start()
    try:
        assert GroupResult([app.AsyncResult(i) for i in ids]).get(timeout=10) == ids
    finally:
        timer.cancel()
        timer.join(10)
    assert max(sizes, default=0) <= 10  # a window, never all 35 ids (memory/rpc read their table directly)


def test_waiting_on_many_asks_for_about_as_many_ids_as_were_found_ready_last(app, monkeypatch):
    # A worker storing small batches is not answered with reads of a thousand ids still pending.
    from engine.backends import base

    ids = [f"b{i}" for i in range(300)]
    sizes = []
    real = app.backend.get_many_encoded
    monkeypatch.setattr(app.backend, "get_many_encoded", lambda wanted: sizes.append(len(wanted)) or real(wanted))

    def store_in_batches():
        for start in range(0, len(ids), 30):
            for task_id in ids[start:start + 30]:
                store(app, task_id, states.SUCCESS, task_id)
            time.sleep(0.02)

    writer = threading.Thread(target=store_in_batches)
    writer.start()
    try:
        assert GroupResult([app.AsyncResult(i) for i in ids]).get(timeout=10) == ids
    finally:
        writer.join(10)
    assert max(sizes, default=0) <= 2 * base.WAIT_AHEAD_MIN < len(ids)  # (memory/rpc read their table)


def test_a_wait_on_many_reads_when_a_result_is_stored_not_at_every_poll(app, monkeypatch):
    # sqlite: the commit counter says when another connection stored something; memory and
    # rpc wait on their table's condition. A second of nothing must not mean dozens of reads.
    url = app.conf.result_backend
    writer = Engine("writer", backend=url, set_as_current=False) if url.startswith("sqlite") else app
    reads = []
    real = app.backend.get_many_encoded
    monkeypatch.setattr(app.backend, "get_many_encoded", lambda wanted: reads.append(1) or real(wanted))
    timer = threading.Timer(1.0, store, (writer, "soon", states.SUCCESS, 1))
    timer.start()
    started = time.monotonic()
    try:
        assert GroupResult([app.AsyncResult("soon")]).get(timeout=20, interval=30) == [1]
    finally:
        timer.cancel()
        timer.join(10)
        if writer is not app:
            writer.close()
    assert time.monotonic() - started < 10  # woken by the store, not after the 30 s interval
    assert len(reads) <= 3  # polling with backoff would have read about 20 times in that second


def test_forgetting_a_group_forgets_every_member_at_once(app):
    ids = [f"f{i}" for i in range(1500)]  # more than one query's or command's worth
    for task_id in ids:
        store(app, task_id, states.SUCCESS, 1)
    store(app, "kept", states.SUCCESS, 2)
    group = GroupResult([app.AsyncResult(i) for i in ids])
    group.forget()
    assert app.backend.get_many_encoded(ids + ["kept"]).keys() == {"kept"}
    assert group.completed_count() == 0


def test_a_group_reads_each_member_from_its_own_backend_and_decodes_as_each_decodes(app, tmp_path):
    other = Engine("other", backend="memory://", set_as_current=False)
    seen = []

    class Marking(type(other.backend)):
        def decode(self, record):  # a backend's own decoding is kept by bulk reads
            seen.append(record.task_id)
            return super().decode(record)

    other._backend = Marking("memory://", other)
    try:
        store(app, "mine", states.SUCCESS, {"n": 1})
        store(other, "theirs", states.SUCCESS, [2])
        store(app, "blob", states.SUCCESS, b"\x00raw")
        group = GroupResult([app.AsyncResult("mine"), other.AsyncResult("theirs"), app.AsyncResult("blob")])
        assert group.get(timeout=5) == [{"n": 1}, [2], b"\x00raw"]
        assert seen == ["theirs"]
    finally:
        other.close()


def test_decoding_many_records_is_decoding_each(app):
    records = {f"r{i}": StateRecord(f"r{i}", state, raw, None, 1.5) for i, (state, raw) in enumerate([
        (states.SUCCESS, dumps(1)), (states.FAILURE, dumps(ValueError("x"))), (states.SUCCESS, bytearray(dumps("s"))),
        (states.SUCCESS, memoryview(dumps([1]))), (states.PENDING, None)])}
    many = app.backend.decode_many(records)
    one = {task_id: app.backend.decode(record) for task_id, record in records.items()}
    assert list(many) == list(one)
    for task_id in records:
        a, b = many[task_id], one[task_id]
        assert (a.task_id, a.state, a.traceback, a.timestamp) == (b.task_id, b.state, b.traceback, b.timestamp)
        assert (repr(a.result) if isinstance(a.result, Exception) else a.result) == \
            (repr(b.result) if isinstance(b.result, Exception) else b.result)


def test_a_result_class_that_reads_its_backend_its_own_way_is_read_from_it(app):
    from engine.result import AsyncResult

    other = Engine("elsewhere", backend="memory://", set_as_current=False)

    class Elsewhere(AsyncResult):
        @property
        def backend(self):
            return other.backend

    try:
        store(other, "there", states.SUCCESS, "from elsewhere")
        store(app, "here", states.SUCCESS, "from here")
        group = GroupResult([app.AsyncResult("here"), Elsewhere("there", None, None, app)])
        assert group.get(timeout=5) == ["from here", "from elsewhere"]
    finally:
        other.close()
