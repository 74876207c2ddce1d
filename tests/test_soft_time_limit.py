"""Soft time limits in a pool child: the request's ``on_timeout(True, limit)`` runs, the task sees the exception.

These drive the child's own ``_run_one`` in this process, with the SIGALRM
handler ``child_main`` installs and a real pipe to read the reports from, so
no worker process is needed. (Hard limits, handled by the supervisor, are
covered by the worker tests.)
"""

from __future__ import annotations

import signal
import time

import pytest

from engine import Engine, serialization, states
from engine.core import encode_message
from engine.exceptions import SoftTimeLimitExceeded
from engine.request import Request
from engine.worker import child, pipe
from tests.support import child_pipe

# pytest-timeout's default method uses SIGALRM, which these tests need for the soft limit.
pytestmark = pytest.mark.timeout(30, method="thread")

timeouts: list[tuple] = []


class RecordingRequest(Request):
    """Notes every on_timeout call, and whether the task body was still running then."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        timeouts.append((soft, timeout, self.id, getattr(self.task, "running", None)))


class BrokenRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> None:
        raise RuntimeError("handler bug")


app = Engine("softlimits", backend="memory://")


@app.task(bind=True, Request=RecordingRequest, soft_time_limit=0.2)
def cleans_up(self):
    type(self).running = True
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        type(self).running = False
        return "cleaned up"
    return "finished"


@app.task(Request=RecordingRequest)
def does_not_catch(seconds):
    time.sleep(seconds)
    return "finished"


@app.task(Request=BrokenRequest, soft_time_limit=0.2)
def with_a_broken_handler():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task(soft_time_limit=0.2)
def default_request_cleans_up():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@pytest.fixture
def run():
    """``run(message)`` runs one task message as a child does; returns (runtime, {kind: [payload, ...]})."""
    timeouts.clear()
    previous = signal.signal(signal.SIGALRM, child._soft_limit_handler)
    try:
        with child_pipe() as (writer, recorder, read):

            def run_one(message, default_soft=None):
                runtime = child._run_one(encode_message(message), app.tasks, recorder, writer, "test-host",
                                         default_soft)
                return runtime, read()

            yield run_one
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def final_state(frames):
    task_id, state, body, traceback, _ = frames[pipe.RECORD][-1]
    return state, serialization.loads(body), traceback


def test_soft_limit_calls_on_timeout_while_the_task_runs_and_the_task_cleans_up(run):
    message = cleans_up.build_message()
    runtime, frames = run(message)
    assert timeouts == [(True, 0.2, message.id, True)]  # called when the limit fired, before the cleanup
    assert runtime < 5
    assert final_state(frames)[:2] == (states.SUCCESS, "cleaned up")
    assert frames[pipe.DONE] == [[message.id, states.SUCCESS, pytest.approx(runtime), False, 0]]  # attempt 0


def test_soft_limit_from_the_call_or_the_worker_default_fails_a_task_that_does_not_catch_it(run):
    message = does_not_catch.build_message((10,), soft_time_limit=0.1)
    _, frames = run(message)
    state, result, traceback = final_state(frames)
    assert state == states.FAILURE and isinstance(result, SoftTimeLimitExceeded)
    assert timeouts == [(True, 0.1, message.id, None)]
    timeouts.clear()
    message = does_not_catch.build_message((10,))
    _, frames = run(message, default_soft=0.1)  # the worker's --soft-time-limit
    assert final_state(frames)[0] == states.FAILURE
    assert timeouts == [(True, 0.1, message.id, None)]


def test_no_on_timeout_and_no_timer_left_when_the_task_ends_in_time(run):
    message = does_not_catch.build_message((0.01,), soft_time_limit=5)
    _, frames = run(message)
    assert final_state(frames)[:2] == (states.SUCCESS, "finished")
    assert timeouts == []
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert getattr(child, "_soft_limited", None) is None


def test_a_failing_on_timeout_handler_still_lets_the_task_see_the_limit(run):
    message = with_a_broken_handler.build_message()
    runtime, frames = run(message)
    assert runtime < 5
    assert final_state(frames)[:2] == (states.SUCCESS, "cleaned up")


def test_a_task_of_the_default_request_class_gets_its_soft_limit_too(run):
    # A soft limit takes a task of the default Request off the child's direct path: the timer is set.
    runtime, frames = run(default_request_cleans_up.build_message())
    assert runtime < 5
    assert final_state(frames)[:2] == (states.SUCCESS, "cleaned up")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
