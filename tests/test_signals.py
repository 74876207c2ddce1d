"""Signals (issue 16, part): Celery's names and arguments, each fired once, in the right process."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from engine import Engine, signals
from engine.signals import Signal


def test_connect_as_decorator_with_a_sender_filter_and_a_dispatch_uid():
    sig = Signal("test_signal")
    calls = []
    a, b = object(), object()

    @sig.connect
    def everyone(sender=None, **kwargs):
        calls.append(("everyone", sender, kwargs["value"]))

    @sig.connect(sender=a)
    def only_a(sender=None, **kwargs):
        calls.append(("only_a", sender, kwargs["signal"]))

    def once(sender=None, **kwargs):
        calls.append(("once", sender))

    sig.connect(once, dispatch_uid="uid")
    sig.connect(once, dispatch_uid="uid")  # a module imported twice: still one receiver
    sig.send(sender=a, value=1)
    assert set(calls) == {("everyone", a, 1), ("only_a", a, sig), ("once", a)} and len(calls) == 3
    calls.clear()
    sig.send(sender=b, value=2)
    assert set(calls) == {("everyone", b, 2), ("once", b)} and len(calls) == 2
    sig.disconnect(dispatch_uid="uid")
    sig.disconnect(everyone)
    calls.clear()
    sig.send(sender=b, value=3)
    assert calls == []


def test_a_receiver_that_raises_is_logged_and_the_others_still_run(caplog):
    sig = Signal("test_signal")

    @sig.connect
    def broken(**kwargs):
        raise RuntimeError("broken receiver")

    @sig.connect
    def fine(**kwargs):
        return "ok"

    responses = dict(sig.send(sender=None))
    assert isinstance(responses[broken], RuntimeError) and responses[fine] == "ok"
    assert "broken receiver" in caplog.text


def test_with_no_receiver_a_send_does_nothing():
    assert Signal("quiet").send(sender=None, anything=1) == []
    assert not signals.task_prerun.receivers  # nothing connected by the engine itself


@pytest.fixture
def eager():
    app = Engine("signals-eager", backend="memory://", task_always_eager=True, set_as_current=False)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def fails():
        raise KeyError("nope")

    yield app
    app.close()


def test_task_signals_fire_in_eager_runs_with_celerys_arguments(eager):
    add, fails = eager.tasks["tests.test_signals.add"], eager.tasks["tests.test_signals.fails"]
    seen = []

    def record(name):
        def receiver(sender=None, **kwargs):
            seen.append((name, sender, kwargs))
        return receiver

    receivers = {name: record(name) for name in ("task_prerun", "task_postrun", "task_success", "task_failure")}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver)
    try:
        add.apply((2, 3))
        fails.apply()
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    names = [name for name, _, _ in seen]
    assert names == ["task_prerun", "task_success", "task_postrun", "task_prerun", "task_failure", "task_postrun"]
    prerun = seen[0][2]
    assert seen[0][1] is add and prerun["task"] is add and prerun["args"] == (2, 3) and prerun["task_id"]
    assert seen[1][2]["result"] == 5
    assert seen[2][2]["retval"] == 5 and seen[2][2]["state"] == "SUCCESS"
    failure = seen[4][2]
    assert isinstance(failure["exception"], KeyError) and failure["einfo"] is not None
    assert seen[5][2]["state"] == "FAILURE"


def test_publish_signals_fire_in_the_client_and_added_headers_travel(eager):
    app = Engine("signals-client", set_as_current=False)
    sent = []
    app.send_message = sent.append

    @app.task
    def add(x, y):
        return x + y

    seen = []

    @signals.before_task_publish.connect(sender=add.name)
    def before(sender=None, headers=None, routing_key=None, body=None, **kwargs):
        seen.append(("before", sender, routing_key, body[0]))
        headers["trace_id"] = "abc"

    @signals.after_task_publish.connect
    def after(sender=None, **kwargs):
        seen.append(("after", sender))

    try:
        add.delay(1, 2)
    finally:
        signals.before_task_publish.disconnect(before, sender=add.name)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", add.name, "celery", (1, 2)), ("after", add.name)]
    assert sent[0].options["headers"] == {"trace_id": "abc"}
    from engine.request import Request

    assert Request(sent[0], add).context().headers == {"trace_id": "abc"}


# --- through a real worker --------------------------------------------------------------


def _read(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(path, predicate, timeout=30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _read(path)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


@pytest.mark.slow
def test_worker_signals_fire_once_each_in_the_right_process(worker_setup, tmp_path):
    from tests import signalapp

    log = tmp_path / "signals.jsonl"
    signalapp.app.close()
    signalapp.app.conf.update(transport=worker_setup.endpoint, result_backend=worker_setup.backend,
                              transport_bind=False, producer_flush_timeout=30)
    worker = worker_setup("--concurrency", "2", "-n", "signalled@test", app_module="tests.signalapp",
                          extra_env={"ENGINE_TEST_SIGNAL_LOG": str(log)})
    try:
        supervisor = worker.pid
        # The children's init and the supervisor's ready come in either order.
        rows = _wait_for(log, lambda rows: sum(r["signal"] == "worker_process_init" for r in rows) == 2
                         and any(r["signal"] == "worker_ready" for r in rows))
        children = {r["pid"] for r in rows if r["signal"] == "worker_process_init"}
        assert [r for r in rows if r["signal"] in ("worker_init", "worker_ready")] == [
            {"signal": "worker_init", "pid": supervisor, "hostname": "signalled@test"},
            {"signal": "worker_ready", "pid": supervisor, "hostname": "signalled@test"}]
        assert supervisor not in children

        assert signalapp.add.delay(2, 3).get(timeout=30) == 5
        with pytest.raises(ValueError, match="bad"):
            signalapp.fails.delay("bad").get(timeout=30)
        assert signalapp.broken_receiver.delay().get(timeout=30) == "ran anyway"  # its prerun receiver raised
        unknown = signalapp.app.send_task("tests.signalapp.nobody_has_this")
        with pytest.raises(Exception, match="nobody_has_this"):
            unknown.get(timeout=30)
        signalapp.app.control.revoke("never-sent-yet")
        late = signalapp.add.apply_async((1, 1), task_id="never-sent-yet")
        with pytest.raises(Exception, match="revoked"):
            late.get(timeout=30)
        signalapp.crash.delay()  # its child dies: the replacement gets worker_process_init too
        rows = _wait_for(log, lambda rows: sum(r["signal"] == "worker_process_init" for r in rows) == 3)

        by_signal: dict[str, list[dict]] = {}
        for row in rows:
            by_signal.setdefault(row["signal"], []).append(row)
        received = by_signal["task_received"]
        assert {r["pid"] for r in received} == {supervisor}
        assert [r["id"] for r in received].count(late.id) == 0  # refused as revoked, never received
        prerun = by_signal["task_prerun"]
        assert {r["pid"] for r in prerun} <= children | {r["pid"] for r in by_signal["worker_process_init"]}
        add_runs = [r for r in prerun if r["name"] == "tests.signalapp.add"]
        assert len(add_runs) == 1 and add_runs[0]["args"] == [2, 3]  # once per run, with its arguments
        assert [r["result"] for r in by_signal["task_success"]] == [5]  # connect(sender=add): add only
        assert len(by_signal["task_failure"]) == 1 and "bad" in by_signal["task_failure"][0]["exception"]
        states = sorted(r["state"] for r in by_signal["task_postrun"])
        assert states == ["FAILURE", "SUCCESS", "SUCCESS"]
        assert [r["name"] for r in by_signal["task_unknown"]] == ["tests.signalapp.nobody_has_this"]
        assert [(r["id"], r["terminated"], r["expired"]) for r in by_signal["task_revoked"]] == [
            ("never-sent-yet", False, False)]
        assert "worker_process_shutdown" not in by_signal  # the crashed child left by os._exit: no shutdown
    finally:
        status = worker.stop(signal.SIGTERM)
    rows = _read(log)
    shutdowns = [r for r in rows if r["signal"] == "worker_process_shutdown"]
    assert status == 0 and len(shutdowns) >= 2 and all(r["exitcode"] == 0 and r["same_pid"] for r in shutdowns)
    assert [r["pid"] for r in rows if r["signal"] == "worker_shutdown"] == [supervisor]
    assert os.path.exists(log)


def test_a_receiver_connected_for_a_shared_task_matches_its_task():
    from engine import shared_task

    app = Engine("signals-shared", set_as_current=False)

    @shared_task
    def shared():
        return None

    calls = []

    def receiver(sender=None, **kwargs):
        calls.append(sender)

    with _current(app):
        signals.task_prerun.connect(receiver, sender=shared)
        try:
            signals.task_prerun.send(sender=app.tasks[shared.name])
        finally:
            signals.task_prerun.disconnect(receiver, sender=shared)
    assert calls == [app.tasks[shared.name]]


class _current:
    """Make ``app`` the current app for the block."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        from engine import current

        self.before = current.get_current_app()
        self.app.set_current()

    def __exit__(self, *exc):
        self.before.set_current()
