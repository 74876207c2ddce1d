"""The supervisor's decisions, in this process: children dying, tasks done, tasks accepted.

The Supervisor is built but never started (``start()`` forks children, opens
sockets and installs signal handlers). Its pool is replaced by :class:`FakePool`,
whose children are :class:`FakeChild` objects: tests give them ``outstanding``
tasks and, where the pipes matter, real ``os.pipe()`` ends, then call the
supervisor's handlers directly (``_child_exited``, ``_task_done``, ``_read_child``,
``accept``, ``_dispatch``). States land in the real state flusher and, flushed,
in a ``memory://`` backend; :class:`FakeJournal` shows what the journal keeps.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import time

import msgpack
import pytest

from engine import Engine, states
from engine.core import TaskMessage, encode_message
from engine.exceptions import NotRegistered, TimeLimitExceeded, WorkerLostError
from engine.worker import pipe
from engine.worker.child import RETIRE_EXIT, ChildRecorder
from engine.worker.scheduler import EWMA_ALPHA, QueuedTask
from engine.worker.shutdown import WARM
from engine.worker.supervisor import Supervisor, _journal_key

_pids = itertools.count(50_000)


class FakeChild:
    """A pool child as the supervisor sees it, without a process; pipes only when given."""

    def __init__(self, reader: pipe.FrameReader | None = None, writer: pipe.FrameWriter | None = None) -> None:
        self.pid = next(_pids)
        self.outstanding: collections.deque = collections.deque()
        self.accepting = True
        self.queued_seconds = 0.0
        self.last_done: bytes | None = None
        self.report_log: str | None = None
        self.reader = reader
        self.writer = writer

    def __repr__(self) -> str:
        return f"<FakeChild {self.pid}>"


class FakePool:
    """The pool's bookkeeping without forking: ``forget()`` returns ``status`` as the child's exit status."""

    def __init__(self, concurrency: int = 2) -> None:
        self.concurrency = concurrency
        self.children: dict[int, FakeChild] = {}
        self.by_fd: dict[int, FakeChild] = {}
        self.status: int | None = -signal.SIGKILL
        self.killed: list[int] = []
        self.spawned: list[FakeChild] = []

    def add(self, child: FakeChild) -> FakeChild:
        self.children[child.pid] = child
        if child.reader is not None:
            self.by_fd[child.reader.fd] = child
        return child

    def forget(self, child):
        self.children.pop(child.pid, None)
        if child.reader is not None:
            self.by_fd.pop(child.reader.fd, None)
        return self.status

    def kill(self, child, sig=signal.SIGKILL):
        self.killed.append(child.pid)

    def spawn(self):
        child = self.add(FakeChild())
        self.spawned.append(child)
        return child


class FakeJournal:
    """What the journal was asked to keep and to forget."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []

    def add(self, key, raw):
        self.added.append(key)
        return key

    def remove(self, keys):
        self.removed += keys

    def commit(self):
        pass


@pytest.fixture
def app():
    application = Engine("sup", backend="memory://")

    @application.task(name="t.work")
    def work(x=0):
        return x

    @application.task(name="t.rerun", acks_late=True, reject_on_worker_lost=True)
    def rerun():
        return None

    @application.task(name="t.quiet", ignore_result=True)
    def quiet():
        return None

    yield application
    application.close()


def in_process_supervisor(app, journal=None) -> Supervisor:
    """A Supervisor that is never started: a FakePool, and ``journal`` (a FakeJournal unless given)."""
    sup = Supervisor(app, concurrency=2, use_journal=False, hostname="w@test")
    sup.pool = sup.limits.pool = FakePool()
    sup.journal = sup.states.journal = journal if journal is not None else FakeJournal()
    return sup


@pytest.fixture
def supervisor(app):
    return in_process_supervisor(app)


@pytest.fixture
def pipes():
    """Make real pipes; every end still open is closed afterwards."""
    opened: list[int] = []

    def make() -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        opened.extend((read_fd, write_fd))
        return read_fd, write_fd

    yield make
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def queued(app, name: str = "t.work", started: float = 0.0, **options) -> QueuedTask:
    task = app.tasks[name]
    message = task.build_message(**options)
    entry = QueuedTask(message, encode_message(message), task, journal_ref=_journal_key(message))
    entry.started = started
    return entry


def child_holding(sup, *entries: QueuedTask, **pipes_) -> FakeChild:
    child = sup.pool.add(FakeChild(**pipes_))
    child.outstanding.extend(entries)
    return child


def stored(sup, task_id: str):
    """Flush the supervisor's states and return the backend's record of ``task_id`` (None: no state)."""
    sup.states.flush(time.monotonic(), force=True)
    return sup.backend.get(task_id)


def waiting_ids(sup) -> list[str]:
    return [entry.message.id for entry in sup.scheduler.waiting]


# --- a child exits ---------------------------------------------------------------------


def test_a_child_dying_mid_task_fails_it_and_its_unstarted_tasks_go_first(app, supervisor):
    already_waiting = queued(app)
    supervisor.scheduler.push(already_waiting)
    running, held1, held2 = queued(app, started=time.monotonic()), queued(app), queued(app)
    child = child_holding(supervisor, running, held1, held2)

    supervisor._child_exited(child)

    record = stored(supervisor, running.message.id)
    assert record.state == states.FAILURE
    assert isinstance(record.result, WorkerLostError)
    assert f"child {child.pid} exited with status -9" in str(record.result)
    assert waiting_ids(supervisor) == [held1.message.id, held2.message.id, already_waiting.message.id]
    assert not child.outstanding
    assert child.pid not in supervisor.pool.children
    assert len(supervisor.pool.spawned) == 1  # replaced at once
    assert supervisor.counters["lost"] == 1
    assert supervisor.journal.removed == [_journal_key(running.message)]  # the others will still run


def test_acks_late_and_reject_on_worker_lost_run_the_lost_task_again_first(app, supervisor):
    running, held = queued(app, "t.rerun", started=time.monotonic()), queued(app)
    child = child_holding(supervisor, running, held)

    supervisor._child_exited(child)

    assert waiting_ids(supervisor) == [running.message.id, held.message.id]
    assert stored(supervisor, running.message.id) is None
    assert supervisor.journal.removed == []
    assert supervisor.counters["requeued"] == 1
    assert len(supervisor.pool.spawned) == 1


def test_a_lost_task_whose_result_is_ignored_stores_nothing_but_leaves_the_journal(app, supervisor):
    running = queued(app, "t.quiet", started=time.monotonic())
    supervisor._child_exited(child_holding(supervisor, running))
    assert stored(supervisor, running.message.id) is None
    assert supervisor.journal.removed == [_journal_key(running.message)]


def test_a_retiring_child_loses_nothing(app, supervisor):
    # It exits with RETIRE_EXIT after its last task's DONE: what it still held never started.
    supervisor.pool.status = RETIRE_EXIT
    held1, held2 = queued(app), queued(app)
    child = child_holding(supervisor, held1, held2)

    supervisor._child_exited(child)

    assert waiting_ids(supervisor) == [held1.message.id, held2.message.id]
    assert stored(supervisor, held1.message.id) is None
    assert supervisor.counters["lost"] == 0
    assert supervisor.journal.removed == []
    assert len(supervisor.pool.spawned) == 1


def test_a_child_killed_for_its_time_limit_fails_its_task_with_time_limit_exceeded(app, supervisor):
    # Even a task that asks to be run again when its child is lost: the limit is the task's own fault.
    supervisor.limits.default_limit = 0.5
    running = queued(app, "t.rerun", started=time.monotonic() - 10)
    child = child_holding(supervisor, running)

    supervisor.limits.enforce(time.monotonic(), supervisor.pool.children.values())
    assert supervisor.pool.killed == [child.pid]
    supervisor._child_exited(child)  # as when the killed child's pipe reports EOF

    record = stored(supervisor, running.message.id)
    assert record.state == states.FAILURE
    assert isinstance(record.result, TimeLimitExceeded)
    assert waiting_ids(supervisor) == []
    assert not supervisor.limits.killing(child.pid)
    assert len(supervisor.pool.spawned) == 1


def test_during_a_warm_stop_a_dead_child_is_replaced_only_while_work_waits(app, supervisor):
    supervisor.signals.requested = WARM
    supervisor.pool.status = 0
    supervisor._child_exited(child_holding(supervisor))
    assert supervisor.pool.spawned == []

    supervisor._child_exited(child_holding(supervisor, queued(app, started=time.monotonic()), queued(app)))
    assert len(supervisor.pool.spawned) == 1  # the unstarted task still has to run somewhere


# --- what a child reports ----------------------------------------------------------------


def done(entry: QueuedTask, state: str = states.SUCCESS, runtime: float = 0.25, requeue: bool = False) -> bytes:
    """A child's DONE payload for ``entry``: id, state, run time, requeue, attempt."""
    return msgpack.packb([entry.message.id, state, runtime, requeue, entry.message.retries])


def test_done_frees_the_task_starts_the_clock_of_the_next_and_learns_the_run_time(app, supervisor):
    first, second = queued(app, started=time.monotonic()), queued(app)
    child = child_holding(supervisor, first, second)

    supervisor._task_done(child, done(first, runtime=0.25))

    assert list(child.outstanding) == [second]
    assert second.started > 0  # its time limit counts from now
    assert supervisor.stats.estimate("t.work") == 0.25
    assert supervisor.counters["done"] == 1
    supervisor.states.flush(time.monotonic())
    assert supervisor.journal.removed == [_journal_key(first.message)]


def test_a_run_of_done_reports_ends_tasks_in_order_before_the_record_that_follows_them(app, supervisor):
    first, second, third = queued(app, started=time.monotonic()), queued(app), queued(app)
    child = child_holding(supervisor, first, second, third)
    record = msgpack.packb((third.message.id, states.SUCCESS, msgpack.packb(3), None, time.time()))
    later = queued(app)
    child.outstanding.append(later)

    # The third task's state comes after the first two DONEs: it is recorded while it is the one running.
    followed: list = []

    class Replies:
        def follow(self, task_id, running_id):
            followed.append((task_id, running_id))

    supervisor.replies = Replies()
    supervisor._handle_child_frames(child, [(pipe.DONE, done(first, runtime=0.1)), (pipe.DONE, done(second)),
                                            (pipe.RECORD, record), (pipe.DONE, done(third))])

    assert followed == [(third.message.id, third.message.id)]
    assert list(child.outstanding) == [later] and later.started > 0
    assert supervisor.counters["done"] == 3 and supervisor.in_children == -3  # none was handed out here
    assert child.last_done == done(third)
    assert supervisor.task_stats.snapshot()["tasks"]["t.work"]["count"] == 3
    assert stored(supervisor, third.message.id).result == 3


def test_without_replies_or_events_a_reads_done_reports_are_applied_together_after_its_records(app, supervisor,
                                                                                                 monkeypatch):
    entries = [queued(app, started=time.monotonic())] + [queued(app) for _ in range(3)]
    child = child_holding(supervisor, *entries)

    def record(entry, value):
        return msgpack.packb((entry.message.id, states.SUCCESS, msgpack.packb(value), None, time.time()))

    calls: list = []
    end_tasks = supervisor._end_tasks
    monkeypatch.setattr(supervisor, "_end_tasks", lambda *args: calls.append(len(args[1])) or end_tasks(*args))
    sent = encode_message(TaskMessage("sent-1", "t.work", (9,)))
    frames = [(pipe.RECORD, record(entries[0], 0)), (pipe.DONE, done(entries[0])),
              (pipe.RECORD, record(entries[1], 1)), (pipe.DONE, done(entries[1])),
              (pipe.SEND, sent),  # what a task sends goes after the tasks ended before it
              (pipe.RECORD, record(entries[2], 2)), (pipe.DONE, done(entries[2]))]
    supervisor._handle_child_frames(child, frames)

    assert calls == [2, 1]  # one pass per run of reports between frames of other kinds
    assert list(child.outstanding) == entries[3:] and entries[3].started > 0
    assert supervisor.counters["done"] == 3 and child.last_done == done(entries[2])
    assert [stored(supervisor, e.message.id).result for e in entries[:3]] == [0, 1, 2]
    assert "sent-1" in waiting_ids(supervisor)


def test_a_malformed_done_report_in_a_run_stops_it_with_the_tasks_before_it_counted(app, supervisor):
    first, second = queued(app, started=time.monotonic()), queued(app)
    child = child_holding(supervisor, first, second)
    with pytest.raises(ValueError):
        supervisor._handle_child_frames(child, [(pipe.DONE, done(first)), (pipe.DONE, b"\xc1 not msgpack"),
                                                (pipe.DONE, done(second))])
    assert list(child.outstanding) == [second] and supervisor.counters["done"] == 1
    assert supervisor.in_children == -1 and child.last_done == b"\xc1 not msgpack"


def test_a_task_rejected_with_requeue_waits_again_and_stays_in_the_journal(app, supervisor):
    entry = queued(app, started=time.monotonic())
    child = child_holding(supervisor, entry)

    supervisor._task_done(child, done(entry, states.REJECTED, requeue=True))

    assert waiting_ids(supervisor) == [entry.message.id]
    assert supervisor.counters["requeued"] == 1
    supervisor.states.flush(time.monotonic(), force=True)
    assert supervisor.journal.removed == []


def test_a_requeued_task_in_a_run_of_reports_waits_again_and_the_others_end(app, supervisor):
    first, second, third = queued(app, started=time.monotonic()), queued(app), queued(app)
    child = child_holding(supervisor, first, second, third)

    supervisor._tasks_done(child, [done(first, runtime=0.5), done(second, states.REJECTED, requeue=True),
                                   done(third, runtime=0.25)])

    assert not child.outstanding and waiting_ids(supervisor) == [second.message.id]
    assert supervisor.counters["done"] == 3 and supervisor.counters["requeued"] == 1
    assert supervisor.task_stats.snapshot()["tasks"]["t.work"]["by_state"] == {"SUCCESS": 2, "REJECTED": 1}
    assert supervisor.stats.estimate("t.work") == pytest.approx(0.5 + EWMA_ALPHA * (0.25 - 0.5))
    supervisor.states.flush(time.monotonic(), force=True)
    assert supervisor.journal.removed == [_journal_key(first.message), _journal_key(third.message)]


def test_done_for_a_task_the_child_was_not_given_is_logged_and_ignored(app, supervisor, caplog):
    child = child_holding(supervisor)
    supervisor._task_done(child, done(queued(app)))
    assert "it was not given" in caplog.text
    assert supervisor.counters["done"] == 0


def test_a_childs_states_done_and_exit_are_read_from_its_pipe(app, supervisor, pipes):
    read_fd, write_fd = pipes()
    task_fd = pipes()[1]
    running = queued(app, started=time.monotonic())
    child = child_holding(supervisor, running, reader=pipe.FrameReader(read_fd),
                          writer=pipe.FrameWriter(task_fd, blocking=False))
    # The child's side: its recorder's state, then DONE, then it exits.
    writer = pipe.FrameWriter(write_fd, blocking=True)
    ChildRecorder(writer, accept_pickle=False).record(running.message.id, states.SUCCESS, 42)
    writer.add(pipe.DONE, done(running))
    writer.flush()
    os.close(write_fd)
    supervisor.pool.status = 0

    supervisor._read_child(child)  # the poll said readable: the frames

    assert stored(supervisor, running.message.id).result == 42
    assert not child.outstanding
    assert child.pid in supervisor.pool.children

    supervisor._read_child(child)  # readable again: EOF

    assert child.pid not in supervisor.pool.children
    assert supervisor.counters["lost"] == 0
    assert len(supervisor.pool.spawned) == 1


def test_a_corrupt_stream_from_a_child_kills_and_replaces_it(app, supervisor, pipes):
    read_fd, write_fd = pipes()
    running = queued(app, started=time.monotonic())
    child = child_holding(supervisor, running, reader=pipe.FrameReader(read_fd))
    os.write(write_fd, pipe.HEADER.pack(pipe.MAX_FRAME + 1, pipe.DONE))

    supervisor._read_child(child)

    assert supervisor.pool.killed == [child.pid]
    assert isinstance(stored(supervisor, running.message.id).result, WorkerLostError)
    assert len(supervisor.pool.spawned) == 1


# --- accepting and handing out ---------------------------------------------------------------


def test_an_unknown_task_fails_with_not_registered_and_leaves_the_journal(supervisor):
    message = TaskMessage("unknown-1", "t.nobody")

    supervisor.accept(message, encode_message(message))

    assert len(supervisor.scheduler) == 0
    assert supervisor.counters["unknown"] == 1
    record = stored(supervisor, "unknown-1")
    assert record.state == states.FAILURE
    assert isinstance(record.result, NotRegistered)
    assert supervisor.journal.added == supervisor.journal.removed == [_journal_key(message)]


def test_a_task_with_a_future_eta_waits_in_the_timer_heap(app, supervisor):
    later = app.tasks["t.work"].build_message(countdown=60)
    now = app.tasks["t.work"].build_message(eta=time.time() - 1)  # already due

    supervisor.accept(later, encode_message(later))
    supervisor.accept(now, encode_message(now))

    assert waiting_ids(supervisor) == [now.id]
    assert len(supervisor.timers) == 1
    assert supervisor.timers.next_due() == later.eta
    [entry] = supervisor.timers.pop_due(now=later.eta)
    assert entry.message.id == later.id
    assert supervisor.journal.added == [_journal_key(later), _journal_key(now)]  # journaled either way


def test_dispatch_writes_each_task_to_its_child_and_starts_the_head(app, supervisor, pipes):
    children = []
    for _ in range(2):
        read_fd, write_fd = pipes()
        children.append((child_holding(supervisor, writer=pipe.FrameWriter(write_fd, blocking=False)),
                         pipe.FrameReader(read_fd)))
    entries = [queued(app) for _ in range(3)]
    for entry in entries:
        supervisor.accept(entry.message, entry.raw)

    supervisor._dispatch()

    (first, first_pipe), (second, second_pipe) = children
    assert [e.message.id for e in first.outstanding] == [entries[0].message.id, entries[2].message.id]
    assert [e.message.id for e in second.outstanding] == [entries[1].message.id]
    assert first_pipe.read() == [(pipe.TASK, entries[0].raw), (pipe.TASK, entries[2].raw)]
    assert second_pipe.read() == [(pipe.TASK, entries[1].raw)]
    assert first.outstanding[0].started > 0 and second.outstanding[0].started > 0
    assert first.outstanding[1].started == 0.0  # queued behind the running one


def test_the_count_of_tasks_in_children_follows_dispatch_done_and_exit(app, supervisor, pipes):
    read_fd, write_fd = pipes()
    child = child_holding(supervisor, writer=pipe.FrameWriter(write_fd, blocking=False))
    for entry in [queued(app) for _ in range(3)]:
        supervisor.accept(entry.message, entry.raw)
    supervisor._dispatch()
    assert supervisor.in_children == len(child.outstanding) == 3

    done = child.outstanding[0]
    supervisor._task_done(child, msgpack.packb([done.message.id, states.SUCCESS, 0.001, False, 0]))
    assert supervisor.in_children == 2

    supervisor._child_exited(child)
    assert supervisor.in_children == 0  # the rest went back to the scheduler
    assert len(supervisor.scheduler) == 1  # the running one was lost, the other one waits again


def test_tasks_that_never_ran_say_nothing_of_their_kinds_run_time(app, supervisor):
    running = queued(app)
    child = child_holding(supervisor, running)
    supervisor.stats.add("t.work", 1.0)
    supervisor._task_done(child, msgpack.packb([running.message.id, states.REVOKED, 0.00002, False, 0]))
    assert supervisor.stats.estimate("t.work") == 1.0  # an expired task did not run


def test_a_message_the_supervisor_sends_itself_goes_to_a_child_at_once(app, supervisor, pipes):
    # A chord's body is sent from a state flush, after the turn's dispatch: it must not wait
    # for the next poll, which may sleep until the next housekeeping pass.
    read_fd, write_fd = pipes()
    child = child_holding(supervisor, writer=pipe.FrameWriter(write_fd, blocking=False))
    body = app.tasks["t.work"].build_message((1,))

    supervisor._route_message(body)

    assert [e.message.id for e in child.outstanding] == [body.id]
    assert pipe.FrameReader(read_fd).read() == [(pipe.TASK, encode_message(body))]


def test_a_revoked_task_a_dead_child_held_is_not_run_elsewhere(app, supervisor):
    running, revoked, other = queued(app, started=1.0), queued(app), queued(app)
    child = child_holding(supervisor, running, revoked, other)
    supervisor.in_children = 3
    supervisor.revoked.add([revoked.message.id])
    supervisor._child_exited(child)
    assert waiting_ids(supervisor) == [other.message.id]  # put back to run elsewhere, the revoked one not
    assert stored(supervisor, revoked.message.id).state == states.REVOKED
    assert revoked.journal_ref in supervisor.journal.removed


def test_a_replayed_task_whose_final_state_is_stored_does_not_run_again(app, tmp_path):
    from engine.core import encode_batch
    from engine.worker.journal import Journal

    messages = [app.tasks["t.work"].build_message((i,)) for i in range(3)]
    journal = Journal(str(tmp_path / "journal.db"))
    ref = journal.add_frame(encode_batch(messages), 3)
    journal.commit()
    journal.close()
    app.backend.store_state(messages[1].id, states.SUCCESS, 1)  # it finished before the crash

    sup = in_process_supervisor(app, Journal(str(tmp_path / "journal.db")))
    try:
        sup._replay()
        assert waiting_ids(sup) == [messages[0].id, messages[2].id]
        assert sup.journal._frame_left == {ref: 2}  # the finished one is released, the others still held
    finally:
        sup.journal.close()
