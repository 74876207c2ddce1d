"""The loop a pool child runs: read task messages, trace them, report back.

A child reads framed task messages from its pipe, looks the task up in the
registry it inherited at fork, runs it through the task's request class (a task
of the default ``Request`` class, with no soft limit or expiry, straight through
the tracer: that class only wraps it; a plain one, with nothing of its own
around the call, in one compiled step, ``engine.core.PlainRunner``) and writes
back, batched: the states to record, a DONE per task, and messages the task
sent (retries, chain steps, callbacks), which the supervisor queues itself. A
child never outlives its supervisor: the kernel kills it when the supervisor
dies (PR_SET_PDEATHSIG), and it exits on EOF of its pipe.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import msgpack

from engine import context, serialization, signals, states, tracer
from engine.context import Context
from engine.core import PlainRunner, decode_message, encode_message, pack_done
from engine.exceptions import EncodeError, MessageDecodeError, NotRegistered, SoftTimeLimitExceeded, TaskRevokedError
from engine.request import Request, request_context
from engine.tracer import trace_task
from engine.utils import process
from engine.worker import pipe
from engine.worker.report_log import ReportLog

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.core import TaskMessage, TaskRegistry
    from engine.task import Task

__all__ = ("ChildProducer", "ChildRecorder", "child_main", "plain_runner")

logger = logging.getLogger("engine.worker.child")

#: Exit status of a child that retires on purpose (task or memory limit): nothing it held had started.
#: Distinct from 0 so that a task calling os._exit(0) is not mistaken for a retirement.
RETIRE_EXIT = 75
#: A task that ran longer than this is reported at once (seconds).
REPORT_SLOWER_THAN = 0.001
#: Reports wait at most this long while the child is busy with tiny tasks (seconds).
REPORT_EVERY = 0.005
#: After tasks that ran this long since the last read (seconds), look in the pipe for a revoke
#: of the tasks still ahead before starting the next one (tiny tasks never pay for the look).
REVOKE_LOOKAHEAD = 0.005
#: ... and at most this many bytes.
REPORT_BYTES = 256 * 1024
#: Between two batches, reports go to the child's report log at least this often (seconds): what
#: the log holds is what a restarted supervisor need not run again (engine.worker.report_log).
LOG_EVERY = 0.001
#: Seconds between checks that the supervisor is still there.
PARENT_CHECK = 1.0
#: What PlainRunner.run_many stopped for, besides a frame it leaves to the loop: time to look for
#: revokes in the pipe, or the child's task limit reached.
_LOOKAHEAD_DUE = 1
_RETIRE_DUE = 2
#: This child's last run time per task name: a kind not seen yet, or one that ran longer than
#: REPORT_SLOWER_THAN, gets the reports of the tasks before it flushed before it starts.
_last_run_times: dict[str, float] = {}
_PR_SET_PDEATHSIG = 1
#: Signals a child ignores: its supervisor decides when it stops (see child_main).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class ChildRecorder:
    """The recorder a child's tracer writes to: states go to the supervisor, serialized."""

    __slots__ = ("accept_pickle", "writer")

    def __init__(self, writer: pipe.FrameWriter, accept_pickle: bool) -> None:
        self.writer = writer
        self.accept_pickle = accept_pickle

    def record(self, task_id: str, state: str, result: Any = None, traceback: str | None = None,
               timestamp: float | None = None) -> bool:
        """Serialize one state for the supervisor; raises EncodeError for a result msgpack cannot pack."""
        body = serialization.dumps(result, self.accept_pickle)
        self.writer.add(pipe.RECORD, serialization.dumps((task_id, state, body, traceback, timestamp or time.time())))
        if state not in states.READY_STATES:
            # STARTED and custom states matter while the task still runs: send them now
            # (final states ride with the next batch).
            self.writer.flush()
        return True


class ChildProducer:
    """What ``app.send_message`` uses inside a child: the supervisor queues the message."""

    def __init__(self, writer: pipe.FrameWriter) -> None:
        self.writer = writer
        self.pid = process.pid()

    #: Results never come back to a child: an rpc:// task sent from a task replies to its own caller.
    client_id = None

    def usable(self) -> bool:
        return self.pid == process.pid()

    def add_result_handler(self, handler: Any) -> None:
        """Nothing to register: see ``client_id``."""

    def send(self, message: TaskMessage) -> None:
        self.writer.add(pipe.SEND, encode_message(message))

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> None:
        """Nothing to close: the pipe belongs to the child loop."""


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the EOF and getppid() checks below still apply


#: The request running under a soft time limit, and that limit (seconds), while its timer is set.
_soft_limited: tuple[Request, float] | None = None


def _soft_limit_handler(signum: int, frame: Any) -> None:
    """SIGALRM: the running task passed its soft limit. Tell its request, then raise in the task."""
    running = _soft_limited
    if running is not None:
        request, limit = running
        try:
            request.on_timeout(True, limit)  # Celery's pool calls it when the soft limit fires
        except Exception:
            logger.exception("on_timeout handler of %r failed", request)
    raise SoftTimeLimitExceeded()


def child_main(apps: list[Engine], task_fd: int, result_fd: int, hostname: str, options: dict) -> None:
    """Run tasks until told to stop; never returns (exits the process)."""
    parent = os.getppid()
    _die_with_parent()
    import multiprocessing

    multiprocessing.current_process().name = f"Child-{os.getpid()}"  # log lines say which child
    # Stop signals are the supervisor's to act on, however they arrive: systemd
    # (KillMode=control-group), supervisord (stopasgroup), `kill -- -PGID` and Ctrl-C
    # signal the whole process group. A warm shutdown lets running tasks finish; the
    # supervisor ends a child itself (STOP on its pipe, or SIGKILL for a cold shutdown
    # or a time limit), and the kernel kills it if the supervisor dies.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # SIGHUP (logrotate, a closed terminal) is the supervisor's too: its log file handler reopens
    # the file in every process by itself once the file was moved.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _soft_limit_handler)
    signal.set_wakeup_fd(-1)  # the supervisor's wake-up pipe, inherited: a child's SIGALRM is not its news
    reader = pipe.FrameReader(task_fd)
    writer = pipe.FrameWriter(result_fd, blocking=True, log=_report_log(options.get("report_log")))
    app = apps[0]
    recorder = ChildRecorder(writer, bool(app.conf.accept_pickle))
    producer = ChildProducer(writer)
    for each in apps:
        each._producer = producer
    app.set_current()  # tasks' app-less calls (shared tasks, AsyncResult(id)) use the worker's app
    signals.worker_process_init.send(sender=None)  # e.g. open a database pool per child, after fork
    # What the child set up lives as long as it does: the collector stops walking it, as it does
    # what the child inherited frozen (Supervisor.start). Freezing moves lists, it visits nothing.
    gc.freeze()
    registry = app.tasks
    max_tasks = options.get("max_tasks_per_child") or 0
    max_memory_kib = options.get("max_memory_per_child") or 0
    default_soft = options.get("soft_time_limit")
    poller = select.poll()
    poller.register(task_fd, select.POLLIN)
    #: Ids of tasks this child holds that were revoked (the supervisor's REVOKE frames).
    revoked: set[str] = set()
    # A default soft limit applies to every task: then none is plain.
    runner = None if default_soft else plain_runner(registry, recorder, writer, hostname, revoked)
    # Runs of plain tasks go through the compiled loop step; with a memory limit, whose check after
    # each task is a call of its own, one task at a time.
    run_many = runner.run_many if runner is not None and not max_memory_kib else None
    run_plain = runner.run if runner is not None and max_memory_kib else None
    done = 0
    exit_code = 0
    last_flush = last_checkpoint = time.monotonic()
    try:
        running = True
        while running:
            frames = _take_revokes(reader.frames() or reader.read(), revoked)
            if not frames:
                if reader.eof:
                    break
                writer.flush()  # idle: report everything before sleeping
                last_flush = time.monotonic()
                if not poller.poll(PARENT_CHECK * 1000) and os.getppid() != parent:
                    break
                continue
            read_at = time.monotonic()
            index = 0
            while index < len(frames):  # frames read ahead below are appended: this loop sees them
                if run_many is not None:
                    index, done, last_flush, last_checkpoint, due = run_many(
                        frames, index, done, read_at, last_flush, last_checkpoint, max_tasks, pipe.TASK,
                        REPORT_EVERY, REPORT_BYTES, LOG_EVERY, REVOKE_LOOKAHEAD)
                    if due == _LOOKAHEAD_DUE:
                        read_at = time.monotonic()
                        if poller.poll(0):
                            frames.extend(_take_revokes(reader.read(), revoked))
                        continue
                    if due == _RETIRE_DUE:
                        exit_code = RETIRE_EXIT
                        running = False
                        break
                    if index == len(frames):
                        break
                # A frame the compiled step left: not a task, or a task to run the general way.
                kind, payload = frames[index]
                index += 1
                if kind == pipe.STOP:
                    running = False
                    break
                if kind != pipe.TASK:
                    continue
                runtime = run_plain(payload) if run_plain is not None else None
                if runtime is None:  # not a plain task (or one run_many left): the general way
                    runtime = _run_one(payload, registry, recorder, writer, hostname, default_soft, revoked)
                done += 1
                now = time.monotonic()
                if now - read_at > REVOKE_LOOKAHEAD:
                    # Tasks ran a while since these frames were read: a revoke of one still
                    # ahead may be waiting in the pipe, behind them. At most one look per
                    # REVOKE_LOOKAHEAD, whatever it finds: tiny tasks must not pay a syscall each.
                    read_at = now
                    if poller.poll(0):
                        frames.extend(_take_revokes(reader.read(), revoked))
                # Busy with tiny tasks: report in batches. Otherwise report each task as it
                # ends, so the supervisor's view (time limits, results) stays current.
                if runtime > REPORT_SLOWER_THAN or now - last_flush > REPORT_EVERY or len(writer.buffer) > REPORT_BYTES:
                    writer.flush()
                    last_flush = last_checkpoint = now
                elif now - last_checkpoint > LOG_EVERY:
                    writer.checkpoint()
                    last_checkpoint = now
                if (max_tasks and done >= max_tasks) or (max_memory_kib and _rss_kib() > max_memory_kib):
                    exit_code = RETIRE_EXIT  # what this child still held never started: run elsewhere
                    running = False
                    break
    finally:
        try:
            writer.flush()  # the last reports first: a slow receiver must not hold them back
        except OSError:
            pass
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=exit_code)
        logging.shutdown()
        os._exit(exit_code)


def _report_log(path: str | None) -> ReportLog | None:
    """This child's report log at ``path`` (None without a journal, or when it cannot be made)."""
    if not path:
        return None
    try:
        return ReportLog(path)
    except OSError as exc:
        logger.warning("child %d keeps no report log (its tasks may run twice after a crash): %s", os.getpid(), exc)
        return None


def _rss_kib() -> int:
    import psutil

    return psutil.Process().memory_info().rss // 1024


def _take_revokes(frames: list[tuple[int, bytes]], revoked: set[str]) -> list[tuple[int, bytes]]:
    """Note the ids of REVOKE frames in ``revoked``; return the other frames."""
    if not any(kind == pipe.REVOKE for kind, _ in frames):
        return frames
    for kind, payload in frames:
        if kind == pipe.REVOKE:
            revoked.update(msgpack.unpackb(payload, raw=False))
    return [frame for frame in frames if frame[0] != pipe.REVOKE]


def _run_one(payload: bytes, registry: TaskRegistry, recorder: ChildRecorder, writer: pipe.FrameWriter,
             hostname: str, default_soft: float | None, revoked: set[str] | None = None) -> float:
    """Run one task message; report its states and DONE; return its run time."""
    global _soft_limited
    started = time.monotonic()
    task_id = "?"
    retries = 0
    name = None
    state = states.FAILURE
    requeue = False
    try:
        message = decode_message(payload)
        task_id, name, retries = message.id, message.task, message.retries
        if revoked and task_id in revoked:
            revoked.discard(task_id)
            recorder.record(task_id, states.REVOKED, TaskRevokedError("revoked"), "TaskRevokedError: revoked")
            if signals.task_revoked.receivers:
                task = registry.get(name)
                signals.task_revoked.send(sender=task, request=task.request_class(message, task) if task else None,
                                          terminated=False, signum=None, expired=False)
            pack_done(writer.buffer, pipe.DONE, task_id, states.REVOKED, 0.0, False, retries)
            return 0.0
        task = registry.lookup(name)
        soft = message.options.get("soft_time_limit") or task.soft_time_limit or default_soft
        request_class = task.request_class
        if writer.buffer and _last_run_times.get(name, REPORT_SLOWER_THAN) >= REPORT_SLOWER_THAN:
            # This one may run long: report what finished before it first. Until the supervisor
            # reads those DONEs it takes a finished task for the running one (time limits,
            # blame if the child dies) and holds back its result.
            writer.flush()
        if request_class is Request and not soft and message.expires is None:
            # The default request only wraps the tracer: its hooks do nothing, and without a soft
            # limit or an expiry nothing else refers to it. Most tasks run here, unwrapped (hooks
            # patched into Request itself are not called here: subclass it, as Celery's docs show).
            outcome = trace_task(task, request_context(message, hostname), recorder)
        else:
            request = request_class(message, task, recorder=recorder, hostname=hostname)
            if soft:
                _soft_limited = (request, float(soft))
                signal.setitimer(signal.ITIMER_REAL, float(soft))
            try:
                outcome = request.execute()
            finally:
                if soft:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    _soft_limited = None
        state = outcome.state
        if state == states.REJECTED:
            requeue = bool(getattr(outcome.retval, "requeue", False))
    except (MessageDecodeError, NotRegistered) as exc:
        _record_error(recorder, task_id, exc)
    except SoftTimeLimitExceeded as exc:  # raised outside the task body (in a handler)
        _record_error(recorder, task_id, exc)
    except (SystemExit, Exception) as exc:
        _failed_outside(recorder, task_id, exc)
    runtime = time.monotonic() - started
    if name is not None:
        _last_run_times[name] = runtime
    # The attempt number too: a retry keeps the task id, and a report log must not take one
    # attempt's end for another's (engine.worker.report_log).
    pack_done(writer.buffer, pipe.DONE, task_id, state, runtime, requeue, retries)
    return runtime


def _failed_outside(recorder: ChildRecorder, task_id: str, exc: BaseException) -> None:
    """Log and record ``exc`` raised outside the tracer's handling: a task's ``sys.exit()``, or the engine's failure.

    Called inside the ``except`` block (``logger.exception`` shows its traceback).
    """
    if isinstance(exc, SystemExit):  # sys.exit() in a task must not end the child unnoticed
        logger.error("task %s called sys.exit(%r)", task_id, exc.code)
    else:  # the engine's own failure: record it, keep serving
        logger.exception("internal error running task %s", task_id)
    _record_error(recorder, task_id, exc)


def plain_runner(registry: TaskRegistry, recorder: ChildRecorder, writer: pipe.FrameWriter, hostname: str,
                 revoked: set[str]) -> PlainRunner:
    """The compiled step that runs this child's plain task messages (see :class:`engine.core.PlainRunner`).

    ``revoked`` is the child's own set, updated in place as REVOKE frames come.
    """
    return PlainRunner(registry, hostname, writer, recorder, context.running(), Context, _is_plain, tracer.raised,
                       functools.partial(tracer.logger.isEnabledFor, logging.INFO),
                       functools.partial(_failed_outside, recorder), _last_run_times, revoked,
                       (signals.task_prerun.receivers, signals.task_postrun.receivers, signals.task_success.receivers),
                       REPORT_SLOWER_THAN, pipe.DONE)


def _is_plain(task: Task) -> bool:
    # The default request class only wraps the tracer, and a soft limit needs the request's timer.
    return task.request_class is Request and not task.soft_time_limit and tracer.runs_bare(task)


def _record_error(recorder: ChildRecorder, task_id: str, exc: BaseException) -> None:
    if task_id == "?":
        return
    try:
        recorder.record(task_id, states.FAILURE, exc, f"{type(exc).__name__}: {exc}")
    except EncodeError:
        recorder.record(task_id, states.FAILURE, EncodeError(str(exc)), None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("engine.worker.child is started by the supervisor")
