"""The supervisor: one event loop over the transport, the children, timers and states.

Each turn of the loop it receives task batches (acknowledging them), puts
tasks with a future ETA in a timer heap and the rest in the scheduler, hands
waiting tasks to children, reads what children report (DONE, states, messages
tasks sent), grants clients credit from its free capacity, flushes states to
the result backend in batches, and enforces limits. Nothing blocks but the
poll, so one slow child or client never stalls the others.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import socket
import time
from itertools import count
from typing import Any

import msgpack
import zmq

from engine import states
from engine.backends.rpc import pack_records
from engine.core import StateRecorder, decode_message
from engine.exceptions import (
    ImproperlyConfigured,
    MessageDecodeError,
    NotRegistered,
    TimeLimitExceeded,
    WorkerLostError,
)
from engine.serialization import dumps
from engine.transport import protocol
from engine.worker import pipe
from engine.worker.child import RETIRE_EXIT
from engine.worker.consumer import Consumer
from engine.worker.journal import Journal, default_journal_path
from engine.worker.pool import Child, Pool
from engine.worker.scheduler import QueuedTask, RuntimeStats, make_scheduler

__all__ = ("EXIT_COLD", "EXIT_FAILURE", "EXIT_OK", "Supervisor")

logger = logging.getLogger("engine.worker")

#: Warm shutdown finished: every accepted task ran (exit status).
EXIT_OK = 0
#: The worker could not start or crashed.
EXIT_FAILURE = 1
#: Cold shutdown: running tasks were killed.
EXIT_COLD = 3

#: Seconds between two housekeeping passes (limits, silent clients, dead children).
HOUSEKEEPING = 0.05
#: Longest a state waits in the recorder before it is written to the backend.
STATE_FLUSH_INTERVAL = 0.02
#: Bounds of the credit window (tasks a worker holds or has promised).
WINDOW_MAX = 2048
#: Most future (ETA) tasks held before the worker stops granting credit.
MAX_TIMERS = 100_000
#: Task states the supervisor remembers for precedence (each with its encoded result).
RECORDER_ENTRIES = 10_000
#: Seconds between two "alive" frames to every client (an idle worker is otherwise silent).
HEARTBEAT = 1.0
#: Seconds between two saves of the run-time averages to the journal (also saved at shutdown).
RUNTIMES_SAVE_EVERY = 5.0
#: Seconds between two removals of results older than ``result_expires``.
CLEANUP_EVERY = 60.0
#: Seconds a stopping worker waits for other workers to take messages it forwarded.
FORWARD_FLUSH_TIMEOUT = 5.0
#: rpc:// reply routes kept for tasks not finished yet (oldest dropped beyond this).
MAX_REPLY_ROUTES = 200_000
#: Seconds between two looks at tasks the fair scheduler holds back.
HELD_RECHECK = 0.005
#: Seconds a child gets to exit after STOP before it is killed.
STOP_GRACE = 10.0


class Supervisor:
    """Runs a worker until it is told to stop; :meth:`run` returns the exit status."""

    def __init__(self, app: Any, *, concurrency: int, fair: bool = False, binds: list[str] | None = None,
                 connects: list[str] | None = None, queues: list[str] | None = None,
                 prefetch_multiplier: int | None = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, time_limit: float | None = None,
                 soft_time_limit: float | None = None, hostname: str | None = None,
                 apps: list | None = None, curve: tuple[str, str] | None = None,
                 journal: str | None = None, use_journal: bool = True) -> None:
        self.app = app
        self.curve = curve
        conf = app.conf
        self.concurrency = max(1, int(concurrency))
        self.fair = fair
        self.hostname = hostname or f"engine@{socket.gethostname()}"
        self.queues = queues or [conf.task_default_queue]
        self.prefetch = int(prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.time_limit = time_limit if time_limit is not None else conf.task_time_limit
        self.soft_time_limit = soft_time_limit if soft_time_limit is not None else conf.task_soft_time_limit
        endpoints = conf.transport if isinstance(conf.transport, (list, tuple)) else [conf.transport]
        if binds is None and connects is None:
            binds, connects = ([], list(endpoints)) if conf.transport_bind else (list(endpoints), [])
        self.binds, self.connects = list(binds or []), list(connects or [])
        self.registry = app.tasks
        self.journal_path = (journal or default_journal_path((self.binds or self.connects or ["worker"])[0])) \
            if use_journal else None
        self.journal: Journal | None = None
        #: Tasks that ran; they leave the journal once their states are written.
        self._finished: list[str] = []
        # The table only remembers recent states for precedence; kept small because each
        # entry holds an encoded result (rpc/backends hold the real copies).
        self.recorder = StateRecorder(batch_size=512, max_entries=RECORDER_ENTRIES)
        self.backend = app.backend if conf.result_backend else None
        #: rpc:// only: task id -> where its states go (a Peer, or a client id).
        self.replies: dict[str, Any] | None = \
            {} if getattr(self.backend, "replies_over_transport", False) else None
        self.stats = RuntimeStats()
        self.scheduler = make_scheduler(fair, self.prefetch, self.stats, float(conf.worker_queue_seconds))
        self.timers: list[tuple[float, int, QueuedTask]] = []
        self._seq = count()
        self.pool = Pool(apps or [app], self.concurrency, self.hostname, {
            "max_tasks_per_child": max_tasks_per_child or conf.worker_max_tasks_per_child,
            "max_memory_per_child": max_memory_per_child or conf.worker_max_memory_per_child,
            "soft_time_limit": self.soft_time_limit,
        })
        self.counters = {"received": 0, "done": 0, "malformed": 0, "unknown": 0, "lost": 0, "requeued": 0}
        self.stopping: str | None = None
        self._kill_reason: dict[int, tuple[str, float]] = {}
        self._last_flush = 0.0
        self._next_housekeeping = 0.0
        self._held_back = False
        self._next_cleanup = 0.0
        self._next_heartbeat = 0.0
        self._next_runtimes_save = 0.0

    # --- signals -------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGQUIT or self.stopping:
            self.stopping = "cold"
        else:
            self.stopping = "warm"

    def _install_signals(self) -> None:
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_w, False)
        os.set_blocking(self._signal_r, False)
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)

    # --- main loop -----------------------------------------------------------------

    def start(self) -> None:
        """Open the journal, fork the children, then open the transport (children must not inherit sockets)."""
        if self.journal_path:
            self.journal = Journal(self.journal_path)
            saved = self.journal.runtimes()
            self.stats.load(saved)
            self.scheduler.expect_kinds(saved)
        self.pool.start()
        self.context = zmq.Context()
        if self.curve is not None and self.connects:
            raise ImproperlyConfigured("CURVE is supported for workers that bind (--bind), not with --connect")
        self.consumer = Consumer(self.context, self.hostname, self.binds, self.connects, self.queues,
                                 int(self.app.conf.max_message_size), curve=self.curve)
        self._install_signals()
        self._replay()

    def _replay(self) -> None:
        """Queue again what the journal kept from an earlier run (accepted, never finished)."""
        if self.journal is None:
            return
        replayed = 0
        for raw in self.journal.pending():
            try:
                message = decode_message(raw)
            except MessageDecodeError:
                continue
            self.accept(message, raw, journaled=True)
            replayed += 1
        if replayed:
            logger.warning("replaying %d task(s) accepted but not finished before this worker stopped", replayed)

    def run(self) -> int:
        """Serve until a warm or cold shutdown; return the exit status."""
        poller = zmq.Poller()
        for sock in self.consumer.sockets:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._signal_r, zmq.POLLIN)
        registered: set[int] = set()
        stop_sent = False
        listening = True
        while True:
            if self.stopping and listening:
                listening = False
                self.consumer.stop_granting()
                for sock in self.consumer.sockets:
                    poller.unregister(sock)
            for fd in set(self.pool.by_fd) - registered:
                poller.register(fd, zmq.POLLIN)
                registered.add(fd)
            for fd in registered - set(self.pool.by_fd):
                poller.unregister(fd)
                registered.discard(fd)
            timeout = self._poll_timeout()
            if timeout > 0 and self.recorder.pending:
                # About to sleep: write states now. Under load the loop never sleeps
                # and states go out in batches (size or age bound) instead.
                self._flush_states(time.monotonic(), force=True)
                timeout = self._poll_timeout()
            events = poller.poll(timeout * 1000)
            for target, _ in events:
                if target == self._signal_r:
                    _drain(self._signal_r)
                elif isinstance(target, int):
                    child = self.pool.by_fd.get(target)
                    if child is not None:
                        self._read_child(child)
                elif not self.stopping:
                    self._receive(target)
                # Stopping: task frames stay unread and unacknowledged, so their clients
                # send them to another worker once this one is gone.
            now = time.monotonic()
            if self.stopping == "cold":
                return self._cold_stop()
            self._fire_timers()
            self._dispatch()
            if not self.stopping:
                self._grant()
            if self.journal is not None:
                self.journal.commit()  # on disk before the clients hear "acknowledged"
            self.consumer.flush()
            self._flush_states(now)
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            if self.stopping == "warm":
                if not stop_sent and not len(self.scheduler) and not any(c.outstanding for c in self.pool.children.values()):
                    self._flush_states(now, force=True)
                    for child in self.pool.children.values():
                        child.accepting = False
                        child.writer.add(pipe.STOP, b"")
                        _safe_flush(child)
                    stop_sent = True
                    stop_deadline = now + STOP_GRACE
                if stop_sent and (not self.pool.children or now > stop_deadline):
                    return self._finish_warm()

    def _poll_timeout(self) -> float:
        timeout = HOUSEKEEPING
        if len(self.scheduler) and any(c.accepting and (not c.outstanding or not self.fair)
                                       for c in self.pool.children.values()):
            if not self._held_back:
                return 0.0
            timeout = HELD_RECHECK  # the fair scheduler holds a long task back for a moment
        if self.timers:
            timeout = min(timeout, max(0.0, self.timers[0][0] - time.time()))
        if self.recorder.pending:
            timeout = min(timeout, STATE_FLUSH_INTERVAL)
        return timeout

    # --- receiving -----------------------------------------------------------------

    def _receive(self, sock: zmq.Socket) -> None:
        for peer, raws in self.consumer.receive(sock):
            for raw in raws:
                try:
                    message = decode_message(raw)
                except MessageDecodeError as exc:
                    self.counters["malformed"] += 1
                    self.consumer.consumed_any(peer)  # it was sent against some credit: take it back
                    logger.warning("dropped a malformed task message from %s: %s", peer.name, exc)
                    continue
                self.consumer.consumed(peer, message.queue)
                self.consumer.ack(peer, message.id)
                self.accept(message, raw, peer)

    def accept(self, message: Any, raw: bytes, peer: Any = None, journaled: bool = False) -> None:
        """Take one decoded task message: fail unknown tasks, hold future ones, queue the rest."""
        self.counters["received"] += 1
        if self.journal is not None and not journaled:
            self.journal.add(_journal_key(message), raw)
        if self.replies is not None and message.reply_to and not message.ignore_result:
            # rpc://: remember where this task's states go (the link it came on, else its client id).
            self.replies[message.id] = peer if peer is not None else message.reply_to
        try:
            task = self.registry.lookup(message.task)
        except NotRegistered as exc:
            self.counters["unknown"] += 1
            logger.error("received unknown task %s[%s]: %s", message.task, message.id, exc)
            self._record(message.id, states.FAILURE, exc, f"NotRegistered: {exc}")
            self._finished.append(_journal_key(message))
            return
        entry = QueuedTask(message, raw, task, peer)
        if message.eta is not None and message.eta > time.time():
            heapq.heappush(self.timers, (message.eta, next(self._seq), entry))
        else:
            self.scheduler.push(entry)

    def timers_due(self) -> bool:
        """True when a held ETA task is due now."""
        return bool(self.timers) and self.timers[0][0] <= time.time()

    def _fire_timers(self) -> None:
        if not self.timers:
            return
        now = time.time()
        while self.timers and self.timers[0][0] <= now:
            self.scheduler.push(heapq.heappop(self.timers)[2])

    # --- children ------------------------------------------------------------------

    def _dispatch(self) -> None:
        assigned = self.scheduler.assign(self.pool.children.values())
        self._held_back = not assigned and bool(len(self.scheduler))
        if not assigned:
            return
        now = time.monotonic()
        touched = {}
        for child, entry in assigned:
            if child.outstanding[0] is entry:
                entry.started = now
            child.writer.add(pipe.TASK, entry.raw)
            touched[child.pid] = child
        for child in touched.values():
            _safe_flush(child)

    def _read_child(self, child: Child, until_eof: bool = False) -> None:
        while True:
            try:
                frames = child.reader.read()
            except ValueError as exc:  # corrupt stream: the child is broken
                logger.error("child %d sent a corrupt stream (%s); replacing it", child.pid, exc)
                self.pool.kill(child)
                frames, child.reader.eof = [], True
            self._handle_child_frames(child, frames)
            if not until_eof or not frames or child.reader.eof or child.pid not in self.pool.children:
                break
        if (child.reader.eof or until_eof) and child.pid in self.pool.children:
            self._child_exited(child)
        elif child.writer.pending:
            _safe_flush(child)

    def _handle_child_frames(self, child: Child, frames: list) -> None:
        for kind, payload in frames:
            if kind == pipe.DONE:
                self._task_done(child, payload)
            elif kind == pipe.RECORD:
                task_id, state, body, traceback, timestamp = msgpack.unpackb(payload, raw=False)
                self.recorder.record(task_id, state, body, traceback, timestamp)
            elif kind == pipe.SEND:
                self._accept_from_child(payload)
            elif kind == pipe.READY:
                child.ready = True

    def _task_done(self, child: Child, payload: bytes) -> None:
        task_id, state, runtime, requeue = msgpack.unpackb(payload, raw=False)
        if not child.outstanding:
            logger.error("child %d reported %s it was not given", child.pid, task_id)
            return
        entry = child.outstanding.popleft()
        self.counters["done"] += 1
        self.stats.add(entry.name, runtime)
        if state == states.REJECTED and requeue:
            self.counters["requeued"] += 1
            self.scheduler.push(entry)
        else:
            self._finished.append(_journal_key(entry.message))
        if child.outstanding:
            child.outstanding[0].started = time.monotonic()

    def _accept_from_child(self, raw: bytes) -> None:
        try:
            message = decode_message(raw)
        except MessageDecodeError as exc:
            logger.error("a child sent a malformed message: %s", exc)
            return
        if message.queue in self.queues:
            self.accept(message, raw)
        else:
            # Another worker consumes that queue: this supervisor sends it on as a client.
            self.app.send_message(message)

    def _child_exited(self, child: Child) -> None:
        status = self.pool.forget(child)
        reason = self._kill_reason.pop(child.pid, None)
        held = list(child.outstanding)
        child.outstanding.clear()
        if status == RETIRE_EXIT and reason is None:
            lost = None
            logger.info("child %d retired (task or memory limit)", child.pid)
        else:
            lost = held.pop(0) if held else None
            if not self.stopping or lost is not None:
                logger.error("child %d exited (status %s) while running %s", child.pid, status, lost)
        for entry in reversed(held):  # never started: run them elsewhere
            self.scheduler.push_front(entry)
        if lost is not None:
            self._task_lost(lost, child.pid, status, reason)
        if self.stopping is None or (self.stopping == "warm" and (len(self.scheduler) or self.timers_due())):
            self.pool.spawn()  # during a warm stop too, while accepted work still waits

    def _task_lost(self, entry: QueuedTask, pid: int, status: int | None, reason: tuple | None) -> None:
        task, message = entry.task, entry.message
        self.counters["lost"] += 1
        if reason and reason[0] == "time_limit":
            exc: Exception = TimeLimitExceeded(reason[1])
        else:
            exc = WorkerLostError(f"child {pid} exited with status {status} while running {message.task}[{message.id}]")
        if task.resolve_option("acks_late") and task.resolve_option("reject_on_worker_lost") and reason is None:
            logger.warning("re-running %s[%s] after its child died", message.task, message.id)
            self.counters["requeued"] += 1
            self.scheduler.push_front(entry)
            return
        self._record(message.id, states.FAILURE, exc, f"{type(exc).__name__}: {exc}",
                     ignored=message.ignore_result)
        self._finished.append(_journal_key(message))

    def _record(self, task_id: str, state: str, result: Any, traceback: str | None, ignored: bool = False) -> None:
        if not ignored:
            self.recorder.record(task_id, state, dumps(result), traceback, time.time())

    # --- credit, states, limits ----------------------------------------------------

    def window(self) -> int:
        """Tasks this worker may hold or promise: about ``worker_queue_seconds`` of work per child."""
        low = self.concurrency * self.scheduler.depth()
        average = self.stats.overall
        if not average:
            return low  # nothing measured yet: stay small until run times are known
        wanted = self.concurrency * float(self.app.conf.worker_queue_seconds) / max(average, 1e-6)
        return int(max(low, min(WINDOW_MAX, wanted)))

    def _grant(self) -> None:
        if len(self.timers) >= MAX_TIMERS:
            return
        held = len(self.scheduler) + sum(len(c.outstanding) for c in self.pool.children.values())
        free = self.window() - held - self.consumer.outstanding()
        self.consumer.grant(free, standing=self.concurrency)

    def _flush_states(self, now: float, force: bool = False) -> None:
        recorder = self.recorder
        if not recorder.pending:
            self._release_finished(self._take_finished())
            return
        if not force and not recorder.should_flush and now - self._last_flush < STATE_FLUSH_INTERVAL:
            return
        self._last_flush = now
        # A DONE is read after its task's states, so these tasks' states are all in this flush.
        finished = self._take_finished()
        records = recorder.flush()
        if self.replies is not None:
            self._send_replies(records)
        elif self.backend is not None:
            try:
                self.backend.store(records)
            except Exception as exc:
                logger.error("result backend write of %d state(s) failed, will retry: %s", len(records), exc)
                for record in records:
                    recorder.record(record.task_id, record.state, record.result, record.traceback,
                                    record.timestamp)
                self._finished[:0] = finished
                return
        self._release_finished(finished)

    def _take_finished(self) -> list[str]:
        finished, self._finished = self._finished, []
        return finished

    def _release_finished(self, keys: list[str]) -> None:
        """Their final states are stored: the journal may forget these tasks."""
        if keys and self.journal is not None:
            self.journal.remove(keys)

    def _send_replies(self, records: list) -> None:
        """rpc://: send each client the states of its tasks, one frame per client."""
        by_route: dict[Any, list] = {}
        for record in records:
            route = self.replies.get(record.task_id)
            if route is None:
                continue
            if record.state in states.READY_STATES:
                del self.replies[record.task_id]
            by_route.setdefault(route, []).append(record)
        for route, batch in by_route.items():
            body = pack_records(batch)
            if isinstance(route, str):
                sent = self.consumer.send_to(route, protocol.RESULTS, body)
            else:
                sent = self.consumer.send_peer(route, protocol.RESULTS, body)
            if not sent:
                logger.warning("could not return %d result(s) to client %s (gone?)", len(batch), route)

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + HOUSEKEEPING
        self.consumer.expire(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT
            self.consumer.heartbeat()
        if now >= self._next_cleanup and hasattr(self.backend, "cleanup"):
            self._next_cleanup = now + CLEANUP_EVERY
            try:
                removed = self.backend.cleanup()
                if removed:
                    logger.info("removed %d result(s) older than result_expires", removed)
            except Exception as exc:
                logger.warning("result cleanup failed: %s", exc)
        if now >= self._next_runtimes_save:
            self._next_runtimes_save = now + RUNTIMES_SAVE_EVERY
            self._save_runtimes()
        if self.replies is not None and len(self.replies) > MAX_REPLY_ROUTES:
            # Tasks that ended without a state (Ignore, ignored results) leave routes behind.
            for task_id in list(self.replies)[: len(self.replies) - MAX_REPLY_ROUTES]:
                del self.replies[task_id]
        for child in list(self.pool.children.values()):
            if child.outstanding and child.pid not in self._kill_reason:
                entry = child.outstanding[0]
                limit = entry.message.options.get("time_limit") or entry.task.time_limit or self.time_limit
                if limit and now - entry.started > float(limit):
                    logger.error("task %s[%s] ran past its time limit (%ss): killing child %d",
                                 entry.message.task, entry.message.id, limit, child.pid)
                    self._kill_reason[child.pid] = ("time_limit", float(limit))
                    try:
                        request = entry.task.request_class(entry.message, entry.task, hostname=self.hostname)
                        request.on_timeout(False, float(limit))
                    except Exception:
                        logger.exception("on_timeout handler failed")
                    self.pool.kill(child)
            elif child.writer.pending:
                _safe_flush(child)
        self._reap_strays()

    def _reap_strays(self) -> None:
        # A child whose pipe we missed closing still gets reaped and replaced.
        for pid, child in list(self.pool.children.items()):
            try:
                gone = child.process.status() == "zombie"
            except Exception:  # psutil.NoSuchProcess: already reaped
                gone = True
            if gone:
                self._read_child(child, until_eof=True)

    def _save_runtimes(self) -> None:
        """Keep the run-time averages in the journal file for the next start (best effort)."""
        if self.journal is None or not self.stats.changed:
            return
        self.stats.changed = False
        try:
            self.journal.save_runtimes(self.stats.by_name)
        except Exception as exc:  # a full disk must not stop the worker for a scheduling hint
            logger.warning("could not save task run times to %s: %s", self.journal_path, exc)

    # --- stopping ------------------------------------------------------------------

    def _finish_warm(self) -> int:
        for child in list(self.pool.children.values()):
            self.pool.kill(child)
            self.pool.forget(child)
        if self.timers:
            where = f"kept in the journal {self.journal_path}" if self.journal else "lost (no journal)"
            logger.warning("%d task(s) scheduled for later were not run: %s", len(self.timers), where)
        self._close()
        logger.info("warm shutdown complete: %s", self.counters)
        return EXIT_OK

    def _cold_stop(self) -> int:
        running = sum(len(c.outstanding) for c in self.pool.children.values())
        logger.warning("cold shutdown: killing %d child(ren) with %d task(s) held", len(self.pool.children), running)
        self.pool.kill_all()
        self._close()
        return EXIT_COLD

    def _close(self) -> None:
        self._flush_states(time.monotonic(), force=True)
        if self.app._producer is not None:  # messages forwarded to queues other workers consume
            self.app._producer.close(timeout=FORWARD_FLUSH_TIMEOUT)
            self.app._producer = None
        if self.journal is not None:
            self._save_runtimes()
            self.journal.close()
        self.consumer.flush()
        self.consumer.close()
        self.context.term()
        if self.backend is not None:
            self.backend.close()
        signal.set_wakeup_fd(-1)


def _journal_key(message: Any) -> str:
    # A retry reuses the task id: the attempt number keeps the retry's entry apart from
    # the attempt that is finishing.
    return f"{message.id}:{message.retries}"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _safe_flush(child: Child) -> None:
    try:
        child.writer.flush()
    except OSError:
        pass  # the child is gone; its EOF is handled when read
