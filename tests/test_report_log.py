"""Children's report logs (issue 17, fewer duplicates): what a killed supervisor never stored is not run again."""

from __future__ import annotations

import os

import msgpack
import pytest

from engine import states
from engine.core import TaskMessage, encode_message
from engine.worker import pipe, report_log
from engine.worker.report_log import HEADER, ReportLog, log_path, recover


def frame(kind: int, body: list) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return pipe.HEADER.pack(len(payload), kind) + payload


def record(task_id: str, state: str = states.SUCCESS, value: bytes = b"\x01") -> bytes:
    return frame(pipe.RECORD, [task_id, state, value, None, 1.0])


def done(task_id: str, state: str = states.SUCCESS, requeue: bool = False, attempt: int = 0) -> bytes:
    return frame(pipe.DONE, [task_id, state, 0.001, requeue, attempt])


def done_payload(task_id: str) -> bytes:
    """The payload of ``done(task_id)``: what the supervisor keeps of the last DONE it read."""
    return msgpack.packb([task_id, states.SUCCESS, 0.001, False, 0], use_bin_type=True)


def send(raw: bytes) -> bytes:
    return pipe.HEADER.pack(len(raw), pipe.SEND) + raw


def step(task_id: str, padding: int = 0) -> bytes:
    """An encoded message a task sent (a chain step, say), about ``padding`` bytes larger than the least."""
    return encode_message(TaskMessage(task_id, "t.step", ("x" * padding,)))


def test_a_finished_task_is_recovered_with_its_states_and_the_messages_it_sent(tmp_path):
    log = ReportLog(log_path(str(tmp_path), 1, 101))
    log.append(record("a") + send(step("step-of-a")) + done("a"))
    log.append(record("b", states.RETRY) + done("b", states.RETRY))  # not final: it runs again
    log.append(done("c", states.REJECTED, requeue=True))  # requeued: it runs again
    log.append(frame(pipe.RECORD, ["d", states.STARTED, b"", None, 1.0]))  # killed while running d
    log.close()
    found = recover(str(tmp_path))
    assert set(found) == {"a:0"}  # by attempt: a retry keeps its task's id
    assert found["a:0"].state == states.SUCCESS
    assert [r[:2] for r in found["a:0"].records] == [["a", states.SUCCESS]]
    assert found["a:0"].sends == [("step-of-a", "step-of-a:0", step("step-of-a"))]
    assert list(tmp_path.iterdir()) == []  # read once, then removed


def test_frames_past_the_header_end_are_ignored_and_garbage_is_no_error(tmp_path):
    path = log_path(str(tmp_path), 1, 102)
    log = ReportLog(path)
    log.append(record("a") + done("a"))
    end = log.position
    log.append(record("b") + done("b"))
    os.pwrite(log.fd, HEADER.pack(report_log.MAGIC, end), 0)  # killed before the header moved on
    log.close()
    (tmp_path / "103.log").write_bytes(b"not a report log at all")
    assert set(recover(str(tmp_path))) == {"a:0"}
    assert recover(str(tmp_path / "missing")) == {}


def test_the_ring_wraps_and_keeps_the_latest_frames(tmp_path, monkeypatch):
    monkeypatch.setattr(report_log, "LOG_SIZE", 400)
    log = ReportLog(log_path(str(tmp_path), 1, 104))
    for number in range(10):
        log.append(record(f"t{number}") + done(f"t{number}"))
    log.close()
    found = recover(str(tmp_path))
    assert found and set(found) <= {f"t{n}:0" for n in range(10)} and "t9:0" in found
    assert "t0:0" not in found


def test_a_task_cut_in_two_by_a_wrap_or_a_batch_too_large_is_not_recovered(tmp_path, monkeypatch):
    monkeypatch.setattr(report_log, "LOG_SIZE", 300)
    log = ReportLog(log_path(str(tmp_path), 1, 107))
    log.append(record("a") + done("a"))
    log.append(send(step("y", 167)))  # the start of b: a chain step it sent ...
    log.append(record("b") + done("b"))  # ... and its end, after the ring wrapped: b is not known in full
    log.append(record("c") + done("c"))
    log.append(send(step("z", 400)))  # d's step: larger than the ring, not kept ...
    log.append(done("d"))  # ... so d is not known in full either
    log.close()
    assert set(recover(str(tmp_path))) == {"c:0"}


def test_a_retry_is_not_taken_for_the_attempt_that_sent_it(app, tmp_path):
    from engine.worker.journal import Journal
    from engine.worker.supervisor import _journal_key
    from tests.test_supervisor_inprocess import in_process_supervisor

    journal_path = str(tmp_path / "journal.db")
    first = app.tasks["t.work"].build_message((1,))
    retry = app.tasks["t.work"].build_message((1,), task_id=first.id, retries=1, countdown=600)
    journal = Journal(journal_path)
    journal.add(_journal_key(retry), encode_message(retry))  # the retry waits for its time
    journal.commit()
    journal.close()
    reports = f"{journal_path}.reports"
    os.makedirs(reports)
    log = ReportLog(log_path(reports, 1, 1))  # attempt 0 sent the retry, then ended (retry(throw=False))
    log.append(send(encode_message(retry)) + record(first.id) + done(first.id))
    log.close()
    sup = in_process_supervisor(app, Journal(journal_path))
    sup._recovered = recover(reports)
    try:
        sup._replay()
        assert len(sup.timers) == 1  # the retry still waits: attempt 0's end is not attempt 1's
    finally:
        sup.journal.close()


def test_a_childs_writer_logs_at_checkpoints_and_never_twice(tmp_path):
    read_fd, write_fd = os.pipe()
    try:
        writer = pipe.FrameWriter(write_fd, blocking=True, log=ReportLog(log_path(str(tmp_path), 1, 105)))
        writer.add(pipe.DONE, msgpack.packb(["a", states.SUCCESS, 0.0, False, 0]))
        writer.checkpoint()  # in the log, not yet in the pipe
        assert set(recover(str(tmp_path))) == {"a:0"}
        writer.log = ReportLog(log_path(str(tmp_path), 1, 105))
        writer.add(pipe.DONE, msgpack.packb(["b", states.SUCCESS, 0.0, False, 0]))
        writer.checkpoint()
        writer.add(pipe.DONE, msgpack.packb(["c", states.SUCCESS, 0.0, False, 0]))
        assert writer.flush()
        frames, _ = pipe.split_frames(os.read(read_fd, 65536))
        assert [msgpack.unpackb(p)[0] for _, p in frames] == ["a", "b", "c"]  # the pipe gets everything once
        logged, _ = pipe.split_frames(open(log_path(str(tmp_path), 1, 105), "rb").read()[HEADER.size:])
        assert [msgpack.unpackb(p)[0] for _, p in logged] == ["b", "c"]  # b logged once, c at the flush
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_log_that_cannot_be_written_is_dropped_quietly(tmp_path, caplog):
    log = ReportLog(log_path(str(tmp_path), 1, 106))
    os.close(log.fd)  # the next write fails, as on a full disk
    log.append(done("a"))
    assert log.fd == -1 and "stops keeping its reports" in caplog.text
    log.append(done("b"))  # no error, nothing written


@pytest.fixture
def app():
    from engine import Engine

    app = Engine("reports", backend="memory://", set_as_current=False)

    @app.task(name="t.work")
    def work(x):
        return x

    yield app
    app.close()


def test_a_replayed_task_its_child_logged_as_finished_is_not_run_again(app, tmp_path):
    from engine.core import encode_batch
    from engine.worker.journal import Journal
    from tests.test_supervisor_inprocess import in_process_supervisor, waiting_ids

    journal_path = str(tmp_path / "journal.db")
    messages = [app.tasks["t.work"].build_message((i,)) for i in range(3)]
    step = app.tasks["t.work"].build_message((99,))  # what the finished task sent (a chain step, say)
    journal = Journal(journal_path)
    ref = journal.add_frame(encode_batch(messages), 3, b"client-1")
    journal.commit()
    journal.close()
    reports = f"{journal_path}.reports"
    os.makedirs(reports)
    log = ReportLog(log_path(reports, 1, 4242))
    log.append(record(messages[1].id, value=msgpack.packb(1)) + send(encode_message(step)) + done(messages[1].id))
    log.close()

    sup = in_process_supervisor(app, Journal(journal_path))
    sup._recovered = recover(reports)
    try:
        sup._replay()
        # The logged one does not run again; what it sent does; the others run again.
        assert waiting_ids(sup) == [messages[0].id, step.id, messages[2].id]
        sup.states.flush(0.0, force=True)
        assert app.AsyncResult(messages[1].id).state == states.SUCCESS  # its logged result, stored now
        assert sup.journal._frame_left == {ref: 2}
    finally:
        sup.journal.close()


def test_a_dead_childs_log_tells_its_live_supervisor_which_held_tasks_finished(app, tmp_path):
    from engine.exceptions import WorkerLostError
    from engine.worker.supervisor import _journal_key
    from tests.test_supervisor_inprocess import child_holding, in_process_supervisor, queued, stored, waiting_ids

    sup = in_process_supervisor(app)
    first, second, third, fourth = (queued(app) for _ in range(4))
    child = child_holding(sup, second, third, fourth)
    child.last_done = done_payload(first.message.id)  # first's DONE was read from the pipe already
    child.report_log = log_path(str(tmp_path), 1, 1)
    log = ReportLog(child.report_log)
    ids = [entry.message.id for entry in (first, second, third, fourth)]
    log.append(record(ids[0]) + done(ids[0]) + record(ids[1], value=msgpack.packb(2)) + done(ids[1]))
    log.append(record(ids[2]) + done(ids[2]))  # in its log at its last checkpoint, never in the pipe
    log.append(frame(pipe.RECORD, [ids[3], states.STARTED, b"", None, 1.0]))  # it died running the fourth
    log.close()
    sup._child_exited(child)
    assert stored(sup, ids[1]).state == stored(sup, ids[2]).state == states.SUCCESS  # not run again
    assert isinstance(stored(sup, ids[3]).result, WorkerLostError)  # the one it was running
    assert waiting_ids(sup) == []
    assert sup.journal.removed == [_journal_key(e.message) for e in (second, third, fourth)]

    # A held task that had sent messages may have had them read already: its log is not used.
    fifth, sixth = queued(app), queued(app)
    child = child_holding(sup, fifth, sixth)  # no DONE read from it yet: its log is read from the start
    child.report_log = log_path(str(tmp_path), 1, 2)
    log = ReportLog(child.report_log)
    step = app.tasks["t.work"].build_message((9,))
    log.append(send(encode_message(step)) + record(fifth.message.id) + done(fifth.message.id))
    log.close()
    sup._child_exited(child)
    assert isinstance(stored(sup, fifth.message.id).result, WorkerLostError)
    assert waiting_ids(sup) == [sixth.message.id]
    sup.scheduler.waiting.clear()

    # An earlier end of the same task (rejected and requeued, back on this child) is not this run's.
    again = queued(app)
    child = child_holding(sup, again)
    child.report_log = log_path(str(tmp_path), 1, 3)
    rejected = msgpack.packb([again.message.id, states.REJECTED, 0.001, True, 0])
    child.last_done = rejected
    log = ReportLog(child.report_log)
    log.append(pipe.HEADER.pack(len(rejected), pipe.DONE) + rejected
               + frame(pipe.RECORD, [again.message.id, states.STARTED, b"", None, 1.0]))
    log.close()
    sup._child_exited(child)
    assert isinstance(stored(sup, again.message.id).result, WorkerLostError)  # died running it again
    assert waiting_ids(sup) == []
