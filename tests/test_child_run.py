"""How a pool child runs one task message (``child._run_one``), in this process.

A task of the default ``Request`` class, with no soft limit and no expiry, is
traced without a Request object being built; these check that it sees the same
request and reports the same states as one run through a custom request class,
whose hooks still run, and that an expired message still goes through its request.
"""

from __future__ import annotations

import os
import time

import pytest

from engine import Engine, serialization, signals, states
from engine.core import TaskMessage, encode_message
from engine.request import Request
from engine.worker import child, pipe
from tests.support import child_pipe

hooks: list[tuple] = []


class HookedRequest(Request):
    """Notes the hooks the child calls."""

    def on_accepted(self, time_accepted: float) -> None:
        hooks.append(("accepted", self.id))

    def on_success(self, retval, runtime: float) -> None:
        hooks.append(("success", self.id, retval))


app = Engine("childrun", backend="memory://")


def _seen(request):
    return {"id": request.id, "hostname": request.hostname, "retries": request.retries,
            "queue": request.delivery_info["queue"], "root_id": request.root_id, "eager": request.is_eager,
            "called_directly": request.called_directly, "args": list(request.args), "kwargs": request.kwargs}


@app.task(bind=True)
def plain(self, x, y=0):
    return _seen(self.request)


@app.task(bind=True, Request=HookedRequest)
def hooked(self, x, y=0):
    return _seen(self.request)


@app.task
def fails():
    raise ValueError("bad input")


@app.task(ignore_result=True)
def quiet(x):
    return x


@app.task(track_started=True)
def tracked(x):
    return x


@pytest.fixture
def run():
    """``run(message)`` runs one message as a child does; returns the DONE report and the RECORDs."""
    hooks.clear()
    with child_pipe() as (writer, recorder, read):

        def run_one(message):
            child._run_one(encode_message(message), app.tasks, recorder, writer, "w1@test", None)
            frames = read()
            done = frames[pipe.DONE]
            assert len(done) == 1
            return done[0], frames.get(pipe.RECORD, [])

        yield run_one


@pytest.mark.parametrize("task", [plain, hooked], ids=["default request", "custom request"])
def test_a_task_sees_its_request_and_its_result_is_reported(run, task):
    done, records = run(TaskMessage("id-1", task.name, (2,), {"y": 3}, retries=1, queue="q1"))
    task_id, state, runtime, requeue, retries = done
    assert (task_id, state, requeue, retries) == ("id-1", states.SUCCESS, False, 1)
    assert runtime >= 0
    [(record_id, record_state, body, traceback, _)] = records
    assert (record_id, record_state, traceback) == ("id-1", states.SUCCESS, None)
    assert serialization.loads(body) == {
        "id": "id-1", "hostname": "w1@test", "retries": 1, "queue": "q1", "root_id": "id-1", "eager": False,
        "called_directly": False, "args": [2], "kwargs": {"y": 3}}


def test_a_custom_request_class_gets_its_hooks_called_and_the_default_one_is_not_built(run, monkeypatch):
    run(TaskMessage("id-2", hooked.name, (1,)))
    assert [hook[:2] for hook in hooks] == [("accepted", "id-2"), ("success", "id-2")]
    built = []
    monkeypatch.setattr(Request, "__init__", lambda self, *a, **k: built.append(a))
    done, _ = run(TaskMessage("id-3", plain.name, (1,)))
    assert done[1] == states.SUCCESS and built == []


def test_a_failing_task_is_reported_failed_with_its_traceback(run):
    done, records = run(TaskMessage("id-4", fails.name))
    assert done[1] == states.FAILURE
    [(_, state, body, traceback, _)] = records
    assert state == states.FAILURE and "ValueError: bad input" in traceback


def test_an_expired_message_of_the_default_request_class_is_revoked_not_run(run):
    done, records = run(TaskMessage("id-5", plain.name, (1,), expires=time.time() - 1))
    assert done[1] == states.REVOKED
    assert [record[1] for record in records] == [states.REVOKED]


def test_the_task_signals_fire_on_the_direct_path(run):
    seen = []

    def prerun(sender=None, task_id=None, **kwargs):
        seen.append(("prerun", task_id))

    def success(sender=None, result=None, **kwargs):
        seen.append(("success", result["id"]))

    def postrun(sender=None, task_id=None, state=None, **kwargs):
        seen.append(("postrun", task_id, state))

    for signal, receiver in ((signals.task_prerun, prerun), (signals.task_success, success),
                             (signals.task_postrun, postrun)):
        signal.connect(receiver)
    try:
        run(TaskMessage("id-6", plain.name, (1,)))
    finally:
        for signal, receiver in ((signals.task_prerun, prerun), (signals.task_success, success),
                                 (signals.task_postrun, postrun)):
            signal.disconnect(receiver)
    assert seen == [("prerun", "id-6"), ("success", "id-6"), ("postrun", "id-6", states.SUCCESS)]


def test_an_ignored_result_is_not_reported_and_a_tracked_task_reports_started_first(run):
    done, records = run(TaskMessage("id-7", quiet.name, (1,)))
    assert done[1] == states.SUCCESS and records == []
    done, records = run(TaskMessage("id-8", tracked.name, (5,)))
    assert [(record[0], record[1]) for record in records] == [("id-8", states.STARTED), ("id-8", states.SUCCESS)]
    assert serialization.loads(records[0][2])["pid"] == os.getpid()
