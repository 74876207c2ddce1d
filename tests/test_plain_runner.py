"""The child's compiled step for plain tasks (``engine.core.PlainRunner``), on both twins, in this process.

A child hands each task message to its PlainRunner first and runs the message
through ``child._run_one`` (the general path) only when the runner declines it.
These check that the runner takes plain tasks and reports exactly what the
general path reports for them, in every outcome, and that it declines, having
written nothing, every message the general path must run.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgpack
import pytest

import engine._core_py as py_core
from engine import Engine, context, serialization, signals, states
from engine.core import TaskMessage, encode_message
from engine.exceptions import Ignore, Reject
from engine.request import Request
from engine.task import Task
from engine.worker import child, pipe
from tests.support import CORE_TWINS, child_pipe

app = Engine("plainrunner", backend="memory://")
seen: list = []


@app.task(bind=True)
def echo(self, x, y=0):
    current = context.current()
    seen.append(current is not None and current[0] is self)  # the running task, while it runs
    return {"id": self.request.id, "hostname": self.request.hostname, "retries": self.request.retries,
            "queue": self.request.delivery_info["queue"], "args": list(self.request.args),
            "kwargs": self.request.kwargs, "called_directly": self.request.called_directly}


@app.task
def fails():
    raise ValueError("bad input")


@app.task(bind=True, max_retries=3)
def retried(self):
    raise self.retry(countdown=60)


@app.task
def rejected(requeue):
    raise Reject("no", requeue=requeue)


@app.task
def ignored():
    raise Ignore()


@app.task
def unserializable():
    return object()


@app.task
def exits():
    sys.exit(3)


@app.task(ignore_result=True)
def quiet(x):
    return x


class HookedRequest(Request):
    """A request class of its own: its hooks must run, so the general path runs it."""


@app.task(Request=HookedRequest)
def hooked():
    return 1


@app.task(soft_time_limit=5)
def soft():
    return 1


@app.task(track_started=True)
def tracked():
    return 1


class Handled(Task):
    def on_success(self, retval, task_id, args, kwargs):
        pass


@app.task(base=Handled)
def handled():
    return 1


class Called(Task):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs)


@app.task(base=Called)
def called():
    return 1


@pytest.fixture(params=CORE_TWINS)
def runner(request, monkeypatch):
    """``(run, read, writer)``: ``run(message)`` as the child's loop does first; ``read()`` the frames since."""
    monkeypatch.setattr(child, "PlainRunner", request.param.PlainRunner)
    seen.clear()
    with child_pipe() as (writer, recorder, read):
        monkeypatch.setattr(app, "_producer", child.ChildProducer(writer))  # what tasks send goes to the pipe
        revoked: set[str] = set()
        plain = child.plain_runner(app.tasks, recorder, writer, "w1@test", revoked)

        def run(message):
            return plain.run(message if isinstance(message, bytes) else encode_message(message))

        run.revoked = revoked
        run.plain = plain
        yield run, read, writer


def general(message):
    """What the general path (``child._run_one``) reports for ``message``: ``{kind: [payload, ...]}``."""
    producer = app._producer
    with child_pipe() as (writer, recorder, read):
        app._producer = child.ChildProducer(writer)
        try:
            child._run_one(encode_message(message), app.tasks, recorder, writer, "w1@test", None)
        finally:
            app._producer = producer
        return read()


def comparable(result):
    """A result as compared here: an exception by its type and message (two instances are never equal)."""
    return (type(result).__name__, str(result)) if isinstance(result, BaseException) else result


def without_times(frames):
    """The frames with run times and timestamps taken out (they differ between two runs)."""
    out = {}
    for kind, payloads in frames.items():
        if kind == pipe.DONE:
            payloads = [(task_id, state, requeue, retries) for task_id, state, _, requeue, retries in payloads]
        elif kind == pipe.RECORD:
            payloads = [(task_id, state, comparable(serialization.loads(body)), (traceback or "").splitlines()[-1:])
                        for task_id, state, body, traceback, _ in payloads]
        out[kind] = payloads
    return out


@pytest.mark.parametrize("message", [
    TaskMessage("id-1", echo.name, (2,), {"y": 3}, retries=1, queue="q1"),
    TaskMessage("id-2", fails.name),
    TaskMessage("id-3", rejected.name, (True,)),
    TaskMessage("id-4", rejected.name, (False,)),
    TaskMessage("id-5", ignored.name),
    TaskMessage("id-6", unserializable.name),
    TaskMessage("id-7", quiet.name, (1,)),
    TaskMessage("id-8", echo.name, (1,), options={"ignore_result": True}),
    TaskMessage("id-9", exits.name),
], ids=["success", "failure", "reject-requeue", "reject", "ignore", "unserializable", "ignored-result",
        "ignored-by-call", "sys.exit"])
def test_a_plain_task_is_run_and_reported_as_the_general_path_reports_it(runner, message):
    run, read, _ = runner
    runtime = run(message)
    assert isinstance(runtime, float) and runtime >= 0
    assert without_times(read()) == without_times(general(message))


def test_the_task_sees_its_request_and_is_the_running_task_while_it_runs(runner):
    run, read, _ = runner
    run(TaskMessage("id-10", echo.name, (2,), {"y": 3}, retries=2, queue="q1"))
    [(task_id, state, body, traceback, _)] = read()[pipe.RECORD]
    assert (task_id, state, traceback) == ("id-10", states.SUCCESS, None)
    assert serialization.loads(body) == {"id": "id-10", "hostname": "w1@test", "retries": 2, "queue": "q1",
                                         "args": [2], "kwargs": {"y": 3}, "called_directly": False}
    assert seen == [True] and context.current() is None


def test_a_retry_records_retry_and_sends_the_next_attempt(runner):
    run, read, _ = runner
    run(TaskMessage("id-11", retried.name))
    frames = read()
    assert [done[:2] for done in frames[pipe.DONE]] == [["id-11", states.RETRY]]
    assert [record[:2] for record in frames[pipe.RECORD]] == [["id-11", states.RETRY]]
    assert len(frames[pipe.SEND]) == 1


def test_the_done_report_is_the_bytes_msgpack_packs(runner):
    run, _, writer = runner
    for message in (TaskMessage("i" * 40, quiet.name, (1,), retries=70000),
                    TaskMessage("id-12", rejected.name, (True,), retries=200)):
        writer.buffer.clear()
        run(message)
        [(kind, payload)] = [frame for frame in py_core.split_frames(writer.buffer)[0] if frame[0] == pipe.DONE]
        assert payload == msgpack.packb(tuple(msgpack.unpackb(payload)), use_bin_type=True)
    assert msgpack.unpackb(payload)[3:] == [True, 200]


@pytest.mark.parametrize("message", [
    TaskMessage("id-20", hooked.name),
    TaskMessage("id-21", soft.name),
    TaskMessage("id-22", tracked.name),
    TaskMessage("id-23", handled.name),
    TaskMessage("id-24", called.name),
    TaskMessage("id-25", quiet.name, (1,), expires=4102444800.0),
    TaskMessage("id-26", quiet.name, (1,), options={"soft_time_limit": 1.0}),
    TaskMessage("id-27", quiet.name, (1,), options={"link": [{"task": quiet.name}]}),
    TaskMessage("id-28", quiet.name, (1,), options={"chain": [{"task": quiet.name}]}),
    TaskMessage("id-29", "no.such.task"),
], ids=["request-class", "soft-limit", "track-started", "handler", "call", "expires", "soft-limit-option", "link",
        "chain", "unknown"])
def test_other_messages_are_declined_with_nothing_done(runner, message):
    run, read, writer = runner
    assert run(message) is None
    assert not writer.buffer and read() == {} and context.current() is None


def test_a_malformed_message_or_a_revoked_one_is_declined(runner):
    run, _, writer = runner
    assert run(b"\x93not a message") is None
    run.revoked.add("id-30")
    assert run(TaskMessage("id-30", quiet.name, (1,))) is None
    assert not writer.buffer


@pytest.mark.parametrize("signal", [signals.task_prerun, signals.task_postrun, signals.task_success],
                         ids=["prerun", "postrun", "success"])
def test_a_connected_task_signal_sends_tasks_the_general_way(runner, signal):
    run, _, writer = runner

    def receiver(**kwargs):
        pass

    signal.connect(receiver)
    try:
        assert run(TaskMessage("id-31", quiet.name, (1,))) is None
    finally:
        signal.disconnect(receiver)
    assert run(TaskMessage("id-32", quiet.name, (1,))) is not None


def test_success_logged_at_info_sends_tasks_the_general_way(runner):
    run, _, _ = runner
    tracer_logger = logging.getLogger("engine.tracer")
    level = tracer_logger.level
    tracer_logger.setLevel(logging.INFO)
    try:
        assert run(TaskMessage("id-33", quiet.name, (1,))) is None
    finally:
        tracer_logger.setLevel(level)


class BrokenPipe(pipe.FrameWriter):
    """A child's writer whose pipe is broken (the supervisor gone): every flush fails."""

    __slots__ = ()

    def flush(self):
        raise BrokenPipeError("the supervisor is gone")


def test_a_failure_of_the_engine_around_a_plain_task_is_recorded_and_reported(runner, monkeypatch):
    """A flush that fails before the task starts fails that task, as the general path does."""
    monkeypatch.setattr(child, "_last_run_times", {})  # a kind not run yet: what finished before it is flushed
    read_fd, write_fd = os.pipe()
    try:
        writer = BrokenPipe(write_fd, blocking=True)
        writer.buffer += b"reports of earlier tasks"
        recorder = child.ChildRecorder(writer, accept_pickle=False)
        plain = child.plain_runner(app.tasks, recorder, writer, "w1@test", set())
        assert plain.run(encode_message(TaskMessage("id-40", echo.name, (1,)))) is not None
        frames = dict(py_core.split_frames(writer.buffer[len(b"reports of earlier tasks"):])[0])
    finally:
        os.close(read_fd)
        os.close(write_fd)
    record, done = msgpack.unpackb(frames[pipe.RECORD]), msgpack.unpackb(frames[pipe.DONE])
    assert record[:2] == ["id-40", states.FAILURE] and "BrokenPipeError" in record[3]
    assert done[:2] == ["id-40", states.FAILURE] and seen == []  # the body never ran


def test_a_task_registered_again_under_its_name_is_asked_again(runner):
    run, _, _ = runner
    assert run(TaskMessage("id-41", quiet.name, (1,))) is not None
    original = app.tasks[quiet.name]
    app.tasks.register(quiet.name, hooked)  # another task object under the same name: not plain
    try:
        assert run(TaskMessage("id-42", quiet.name, (1,))) is None
    finally:
        app.tasks.register(quiet.name, original)
    assert run(TaskMessage("id-43", quiet.name, (1,))) is not None


def test_a_plain_check_that_fails_sends_the_task_the_general_way(runner, monkeypatch):
    run, _, writer = runner

    def broken(task):
        raise RuntimeError("cannot tell")

    monkeypatch.setattr(child, "_is_plain", broken)
    with child_pipe() as (writer2, recorder2, _):
        plain = child.plain_runner(app.tasks, recorder2, writer2, "w1@test", set())
        assert plain.run(encode_message(TaskMessage("id-44", quiet.name, (1,)))) is None
        assert not writer2.buffer


def run_many(plain, frames, index=0, done=0, read_at=None, max_tasks=0, report_every=60.0, report_bytes=1 << 20,
             log_every=60.0, lookahead=60.0):
    now = time.monotonic()
    return plain.run_many(frames, index, done, now if read_at is None else read_at, now, now, max_tasks, pipe.TASK,
                          report_every, report_bytes, log_every, lookahead)


def test_run_many_runs_plain_tasks_up_to_a_frame_it_leaves_to_the_loop(runner):
    run, read, _ = runner
    task = [(pipe.TASK, encode_message(TaskMessage(f"id-{n}", quiet.name, (n,)))) for n in range(3)]
    frames = task[:2] + [(pipe.STOP, b"")] + task[2:] + [(pipe.TASK, encode_message(TaskMessage("id-h", handled.name)))]

    index, done, *_, due = run_many(run.plain, frames, done=5)
    assert (index, done, due) == (2, 7, 0)  # stopped at the STOP frame, two tasks run
    index, done, *_, due = run_many(run.plain, frames, index=3, done=done)
    assert (index, done, due) == (4, 8, 0)  # stopped at a task of a custom base: the general way runs it
    reports = read()[pipe.DONE]
    assert [report[0] for report in reports] == ["id-0", "id-1", "id-2"]
    assert all(report[1] == states.SUCCESS for report in reports)
    assert run_many(run.plain, frames, index=5, done=8)[0::4] == (5, 0)  # at the end


def test_run_many_stops_at_the_task_limit_and_when_revokes_are_due(runner):
    run, read, _ = runner
    frames = [(pipe.TASK, encode_message(TaskMessage(f"id-{n}", quiet.name, (n,)))) for n in range(4)]
    assert run_many(run.plain, frames, done=1, max_tasks=3)[0::4] == (2, 2)  # the limit: retire
    assert run_many(run.plain, frames, index=2, read_at=time.monotonic() - 1.0, lookahead=0.5)[0::4] == (3, 1)
    assert run_many(run.plain, frames, index=3)[0::4] == (4, 0)
    assert [report[0] for report in read()[pipe.DONE]] == ["id-0", "id-1", "id-2", "id-3"]


def test_run_many_flushes_and_checkpoints_as_the_loop_does(runner, monkeypatch):
    run, read, writer = runner
    frames = [(pipe.TASK, encode_message(TaskMessage(f"id-{n}", quiet.name, (n,)))) for n in range(3)]
    flushed: list = []
    checkpoints: list = []
    monkeypatch.setattr(pipe.FrameWriter, "flush", lambda self: flushed.append(len(self.buffer)))
    monkeypatch.setattr(pipe.FrameWriter, "checkpoint", lambda self: checkpoints.append(len(self.buffer)))
    before = time.monotonic()
    _, _, last_flush, last_checkpoint, _ = run_many(run.plain, frames[:1], report_every=0.0)
    assert len(flushed) == 1 and flushed[0] > 0 and last_flush == last_checkpoint >= before  # each reported
    _, _, last_flush, last_checkpoint, _ = run_many(run.plain, frames[1:2], log_every=0.0)
    assert len(flushed) == 1 and len(checkpoints) == 1 and last_checkpoint > last_flush
    run_many(run.plain, frames[2:], report_bytes=0)  # a full buffer is reported
    assert len(flushed) == 2 and len(checkpoints) == 1
