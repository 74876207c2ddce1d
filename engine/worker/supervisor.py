"""The supervisor: one event loop over the transport, the children, timers and states.

Each turn of the loop it receives task batches (acknowledging them), puts
tasks with a future ETA in the :class:`~engine.worker.timers.TimerHeap` and
the rest in the scheduler, hands waiting tasks to children, reads what
children report (DONE, states, messages tasks sent), grants clients credit
from its free capacity, and lets its parts do their work: the
:class:`~engine.worker.state_flusher.StateFlusher` writes states in batches
(rpc replies go through the :class:`~engine.worker.replies.ReplyRouter`), the
:class:`~engine.worker.limits.TimeLimits` kill children past their limit, the
journal commits. Nothing blocks but the poll, so one slow child or client
never stalls the others.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Callable

import msgpack
import zmq

from engine import signals, states
from engine.core import (
    decode_message,
    encode_message,
    finish_done,
    read_done,
    read_record,
    take_plain,
    write_assigned,
)
from engine.exceptions import (
    ImproperlyConfigured,
    MessageDecodeError,
    NotRegistered,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from engine.transport.consumer import Consumer
from engine.utils.hostname import HOSTNAME, default_worker_name
from engine.worker import pipe, report_log
from engine.worker.autoscale import Autoscaler
from engine.worker.child import RETIRE_EXIT
from engine.worker.chords import ChordCounter
from engine.worker.control import ControlHandler
from engine.worker.drain import Drain
from engine.worker.journal import Journal, JournalRef, default_journal_path
from engine.worker.limits import TimeLimits
from engine.worker.pool import Child, Pool
from engine.worker.rate_limits import RateLimiter, RedisRateLimiter
from engine.worker.replies import ReplyRouter
from engine.worker.revoked import RevokedSet
from engine.worker.scheduler import QueuedTask, RuntimeStats, make_scheduler
from engine.worker.shutdown import COLD, WARM, ShutdownSignals
from engine.worker.state_flusher import STATE_FLUSH_INTERVAL, StateFlusher
from engine.worker.task_stats import TaskStats
from engine.worker.timers import TimerHeap

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.core import TaskMessage
    from engine.events import EventPublisher
    from engine.transport.protocol import Peer
    from engine.worker.metrics import MetricsServer

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
#: Seconds between two looks for a child that exited without its pipe telling (a psutil read of
#: /proc per child: the pipe's end of file is how an exit is normally seen, at once).
STRAY_CHECK = 1.0
#: Seconds between two "this worker lives" notes to the chord store, each with a look for chords
#: a lost worker completed and never sent the body of (well under backends.base.FIRER_TTL).
CHORD_ADOPT_EVERY = 10.0
#: Bounds of the credit window (tasks a worker holds or has promised).
WINDOW_MAX = 2048
#: Most future (ETA) tasks held before the worker stops granting credit.
MAX_TIMERS = 100_000
#: Seconds between two "alive" frames to every client (an idle worker is otherwise silent).
HEARTBEAT = 1.0
#: Seconds between two saves of the run-time averages to the journal (also saved at shutdown).
RUNTIMES_SAVE_EVERY = 5.0
#: Seconds between two removals of results older than ``result_expires``.
CLEANUP_EVERY = 60.0
#: Seconds a stopping worker waits for other workers to take messages it forwarded.
FORWARD_FLUSH_TIMEOUT = 5.0
#: Seconds between two looks at tasks the fair scheduler holds back.
HELD_RECHECK = 0.005
#: Seconds a child gets to exit after STOP before it is killed.
STOP_GRACE = 10.0
#: Outcomes whose run time is not the kind's (the body did not run, or gave up at once).
NOT_RUN = frozenset({states.REVOKED, states.REJECTED})
#: The event a final state a child reported is published as (``-E``).
_EVENT_OF = {states.SUCCESS: "succeeded", states.FAILURE: "failed", states.RETRY: "retried",
             states.REVOKED: "revoked", states.REJECTED: "rejected", states.IGNORED: "ignored"}


class Supervisor:
    """Runs a worker until it is told to stop; :meth:`run` returns the exit status.

    It wires the parts (pool, scheduler, timers, consumer, state flusher, reply
    router, time limits, journal) and runs the loop; each part can be read and
    tested alone.
    """

    def __init__(self, app: Engine, *, concurrency: int, fair: bool = False, binds: list[str] | None = None,
                 connects: list[str] | None = None, queues: list[str] | None = None,
                 prefetch_multiplier: int | None = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, time_limit: float | None = None,
                 soft_time_limit: float | None = None, hostname: str | None = None,
                 apps: list[Engine] | None = None, curve: tuple[str, str] | None = None,
                 journal: str | None = None, use_journal: bool = True, metrics_port: int | None = None,
                 metrics_host: str = "0.0.0.0", events: bool = False, events_endpoint: str | None = None,
                 autoscale: tuple[int, int] | None = None, shutdown_timeout: float | None = None) -> None:
        self.app = app
        self.curve = curve
        conf = app.conf
        # --autoscale MAX,MIN: the pool starts at MIN children.
        self.concurrency = max(1, int(autoscale[1] if autoscale else concurrency))
        self.fair = fair
        self.hostname = hostname or default_worker_name()
        self.queues = queues or [conf.task_default_queue]
        self.prefetch = int(prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.time_limit = time_limit if time_limit is not None else conf.task_time_limit
        self.soft_time_limit = soft_time_limit if soft_time_limit is not None else conf.task_soft_time_limit
        endpoints = conf.transport if isinstance(conf.transport, (list, tuple)) else [conf.transport]
        if binds is None and connects is None:
            binds, connects = ([], list(endpoints)) if conf.transport_bind else (list(endpoints), [])
        self.binds, self.connects = list(binds or []), list(connects or [])
        self.registry = app.tasks
        self.journal_path = (journal or default_journal_path(  # keyed on the -n name as given: None when unnamed
            hostname, (self.binds or self.connects or ["worker"])[0])) if use_journal else None
        self.journal: Journal | None = None
        self.backend = app.backend if conf.result_backend else None
        #: rpc:// only: where each task's states go.
        self.replies = ReplyRouter() if getattr(self.backend, "replies_over_transport", False) else None
        self.states = StateFlusher(self.backend, self.replies)
        #: Chords whose header tasks run here (with a results store the workers share).
        self.chords = ChordCounter(app, self.backend, self.states, self._route_message) \
            if self.backend is not None and self.backend.supports_chords and self.replies is None else None
        if self.chords is not None:
            self.states.after_store = self.chords.stored
            self.states.may_release = self.chords.all_counted
        self.stats = RuntimeStats()
        self.scheduler = make_scheduler(fair, self.prefetch, self.stats, float(conf.worker_queue_seconds))
        self.timers = TimerHeap()
        self.pool = Pool(apps or [app], self.concurrency, self.hostname, {
            "max_tasks_per_child": max_tasks_per_child or conf.worker_max_tasks_per_child,
            "max_memory_per_child": max_memory_per_child or conf.worker_max_memory_per_child,
            "soft_time_limit": self.soft_time_limit,
        })
        self.limits = TimeLimits(self.pool, self.time_limit, self.hostname)
        self.signals = ShutdownSignals()
        self.consumer: Consumer | None = None
        self.context: zmq.Context | None = None
        self.counters = {"received": 0, "done": 0, "malformed": 0, "unknown": 0, "lost": 0, "requeued": 0}
        #: Per task name counts and timings (``engine inspect stats``).
        self.task_stats = TaskStats()
        #: Task ids and root ids not to start (``engine control revoke``), saved in the journal.
        self.revoked = RevokedSet()
        #: The next free slot of each rate-limited task name (``Task.rate_limit``): this worker's own,
        #: or shared by the cluster through Redis when ``rate_limit_url`` names one.
        self.rate_limiter = RedisRateLimiter(conf.rate_limit_url) if conf.rate_limit_url else RateLimiter()
        #: Tasks waiting in the timer heap for their rate-limit slot (they count against the window).
        self.rate_held = 0
        self.control = ControlHandler(self)
        #: Children told to stop by ``pool_shrink``: their exit is not a loss.
        self._retiring: set[int] = set()
        self._reopen_logs = False
        #: When the loop last turned (monotonic): what /healthz looks at.
        self.last_turn = time.monotonic()
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.metrics: MetricsServer | None = None
        #: ``-E``: where task and worker events go (None: not published).
        self.events_wanted, self.events_endpoint = events, events_endpoint
        self.events: EventPublisher | None = None
        self.autoscaler = Autoscaler(self, autoscale[0], autoscale[1], float(conf.worker_autoscale_keepalive)) \
            if autoscale else None
        #: --shutdown-timeout: a warm shutdown hands unstarted tasks back to their clients (engine.worker.drain).
        self.drain = Drain(self, float(shutdown_timeout)) if shutdown_timeout is not None else None
        #: Failed task id -> the last line of its traceback, until its DONE is read (for the "failed" event).
        self._failure_info: dict[str, str] = {}
        #: Tasks handed to children and not done yet (kept, not summed over the children each turn).
        self.in_children = 0
        #: Tasks the children of a killed predecessor reported finished (read at start, used by the replay).
        self._recovered: dict[str, report_log.RecoveredTask] = {}
        #: Where children keep their report logs (beside the journal; None without one).
        self.report_dir: str | None = None
        #: Report logs of children gone, with the store count when they went (removed after the next store).
        self._dead_logs: list[tuple[int, str]] = []
        self._next_housekeeping = 0.0
        self._next_stray_check = 0.0
        self._next_chord_adopt = time.monotonic() + CHORD_ADOPT_EVERY  # start() said it lives (recover)
        self._held_back = False
        self._next_cleanup = 0.0
        self._next_heartbeat = 0.0
        self._next_runtimes_save = 0.0

    @property
    def stopping(self) -> str | None:
        """None while serving, else the shutdown asked for (``"warm"`` or ``"cold"``)."""
        return self.signals.requested

    # --- main loop -----------------------------------------------------------------

    def start(self) -> None:
        """Open the journal, fork the children, then open the transport (children must not inherit sockets)."""
        if self.curve is not None and self.connects:
            raise ImproperlyConfigured("CURVE is supported for workers that bind (--bind), not with --connect")
        signals.worker_init.send(sender=self)
        if self.journal_path:
            self.journal = self.states.journal = Journal(self.journal_path)
            if self.chords is not None:
                # The journal on this host is the worker's durable identity (an unnamed worker's name
                # has its pid). The host too: pods of one Deployment share the journal's path.
                journal_path = os.path.abspath(self.journal_path)
                self.chords.firer = f"{HOSTNAME}:{journal_path}"
                self.chords.legacy_firer = journal_path  # earlier versions' identity
            self.revoked.load(self.journal.revoked())
            saved = self.journal.runtimes()
            self.stats.load(saved)
            self.scheduler.expect_kinds(saved)
            # What children reported and a killed predecessor never stored: read before new
            # children write their own logs in the same place (see engine.worker.report_log).
            report_dir = f"{self.journal_path}.reports"
            self._recovered = report_log.recover(report_dir)
            try:
                os.makedirs(report_dir, exist_ok=True)
                self.report_dir = self.pool.options["report_dir"] = report_dir
            except OSError as exc:
                logger.warning("children keep no report logs in %s (tasks may run twice after a crash): %s",
                               report_dir, exc)
        # What exists now, the garbage collected first, is mostly what lives as long as the worker
        # (modules, the app, the journal's state): frozen, the collector stops walking it, in the
        # supervisor and in the children forked from it, which so never write to the pages they
        # share with it by collecting (as Python's gc.freeze() documentation advises before a
        # fork). A frozen object that later becomes cyclic garbage is not freed.
        gc.collect()
        gc.freeze()
        self.pool.start()
        self.context = zmq.Context()
        conf = self.app.conf
        self.consumer = Consumer(self.context, self.hostname, self.binds, self.connects, self.queues,
                                 int(conf.max_message_size), curve=self.curve, max_peers=conf.transport_max_peers,
                                 dns_refresh=float(conf.transport_dns_refresh))
        if self.replies is not None:
            self.replies.consumer = self.consumer
        if self.events_wanted:
            from engine.events import EventPublisher, events_endpoint

            endpoint = self.events_endpoint or events_endpoint((self.binds or self.connects)[0])
            self.events = EventPublisher(self.context, endpoint, self.hostname, self.curve)
            self.events_endpoint = endpoint
            self.events.worker("online", self._worker_figures())
        if self.metrics_port is not None:
            from engine.worker.metrics import MetricsServer

            self.metrics = MetricsServer(self, self.metrics_port, self.metrics_host)
            self.metrics.start()
        self.signals.install()
        # SIGHUP: reopen the log files (logrotate). Noted here, done by the loop, which the
        # signal wakes (the wake-up pipe): never in the middle of writing a line.
        signal.signal(signal.SIGHUP, self._on_hangup)
        self._replay()

    def _replay(self) -> None:
        """Queue again what the journal kept from an earlier run (accepted, never finished).

        A task whose final state is already stored (it finished before the crash,
        its frame's row waiting for the others; or another worker ran it after
        its client sent it again) is not run a second time: the results store is
        asked once for all of them. Nor is one that a child's report log shows
        finished (its states and the messages it sent are taken from the log).
        Other tasks that store no result cannot be told apart and run again
        (at-least-once).
        """
        if self.journal is None:
            return
        replayed = skipped = 0
        replayed_ids: set[str] = set()
        pending = list(self.journal.pending())
        # A task held for later got a row of its own while its frame's row stayed for the
        # others: replayed from its own row only, not a second time from the frame.
        own_rows = {ref for ref, _ in pending if isinstance(ref, str)}
        decoded = []
        for ref, raw in pending:
            try:
                message = decode_message(raw)
            except MessageDecodeError:
                self.journal.remove([ref])
                continue
            if isinstance(ref, int) and _journal_key(message) in own_rows:
                self.journal.remove([ref])
                continue
            decoded.append((ref, raw, message))
        recovered, self._recovered = self._recovered, {}
        if self.replies is not None:
            # rpc://: a result sent before its client is back would be dropped, and a client told
            # "acknowledged" would not send the task again: such tasks run again, as before.
            recovered = {}
        # Messages that tasks the logs show finished had sent: accepted again unless known already
        # (keyed by attempt: a retry keeps its task's id), by their key: (task id, message).
        sent: dict[str, tuple[str, bytes]] = {}
        if recovered:
            in_journal = {_journal_key(message) for _, _, message in decoded}
            for _, _, message in decoded:
                task = recovered.get(_journal_key(message))
                for task_id, key, raw in task.sends if task is not None else ():
                    if key not in in_journal:
                        sent[key] = (task_id, raw)
        if self.replies is None:
            # The client of a frame may not have heard "acknowledged" before the crash: it hears it
            # when it is back (its link reconnects by itself), rather than sending the tasks again
            # elsewhere. Only for frames from clients that connected to this worker (--bind).
            senders = self.journal.frame_senders()
            unheard: dict[bytes, list[str]] = {}
            for ref, _, message in decoded:
                if isinstance(ref, int) and ref in senders:
                    unheard.setdefault(senders[ref], []).append(message.id)
            if unheard and self.consumer is not None:
                self.consumer.acknowledge_when_heard(unheard)
        finished = self._finished_already([message.id for _, _, message in decoded]
                                          + [task_id for task_id, _ in sent.values()])
        unsent = {key for key, (task_id, _) in sent.items() if task_id not in finished}
        counted = []
        from_logs = 0
        for ref, raw, message in decoded:
            record = finished.get(message.id)
            task = recovered.pop(_journal_key(message), None) if record is None else None
            if task is not None:
                self._finish_from_log(message, ref, task, unsent)
                replayed_ids.add(message.id)
                from_logs += 1
                continue
            if record is not None:
                if self.chords is not None and message.options.get("chord"):
                    # Kept in the journal because its chord part may not have been counted: count it now.
                    self.chords.watch(message)
                    counted.append(record)
                self.journal.remove([ref])
                replayed_ids.add(message.id)  # a chord body that ran already is not sent again
                skipped += 1
                continue
            self.accept(message, raw, journal_ref=ref)
            replayed_ids.add(message.id)
            replayed += 1
        if counted and self.chords is not None:
            self.chords.stored(counted)
        if replayed or skipped or from_logs:
            logger.warning("replaying %d task(s) accepted but not finished before this worker stopped "
                           "(%d more had finished already, %d of them known from the children's report logs: "
                           "not run again)", replayed, skipped + from_logs, from_logs)
        if self.chords is not None:
            self.chords.recover(replayed_ids)

    def _finish_from_log(self, message: TaskMessage, ref: JournalRef, task: report_log.RecoveredTask,
                         unsent: set[str]) -> None:
        """Finish a replayed task that a child's report log shows finished: its reports, not a second run.

        Of the messages it sent, those in ``unsent`` (by attempt key) are accepted, each once.
        """
        if self.chords is not None:
            self.chords.watch(message)
        for task_id, state, body, traceback, timestamp in task.records:
            self.states.record_encoded(task_id, state, body, traceback, timestamp)
        for _, key, raw in task.sends:
            if key in unsent:
                unsent.discard(key)
                self._accept_from_child(raw)
        self.states.finished(ref)

    def _finished_already(self, task_ids: list[str]) -> dict:
        """The stored final records of those of ``task_ids`` that have one (none without a shared store)."""
        if not task_ids or self.backend is None or self.replies is not None:
            return {}
        try:
            found = self.backend.get_many_encoded(task_ids)
        except Exception as exc:  # the store is down: replay everything (at-least-once)
            logger.warning("could not ask the results store which replayed tasks finished: %s", exc)
            return {}
        return {task_id: record for task_id, record in found.items() if record.state in states.READY_STATES}

    def run(self) -> int:
        """Serve until a warm or cold shutdown; return the exit status."""
        consumer = self.consumer
        assert consumer is not None, "start() first"
        signals.worker_ready.send(sender=self)
        poller = zmq.Poller()
        polled = set(consumer.sockets)  # the transport's sockets in the poller
        polled_generation = consumer.generation
        reading_transport = True
        for sock in polled:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.signals.fd, zmq.POLLIN)
        if self.replies is not None:
            poller.register(self.replies.wake_fd, zmq.POLLIN)
        registered: set[int] = set()
        registered_generation = -1
        stop_sent = False
        stop_deadline = 0.0
        listening = True
        while True:
            if self.stopping and listening:
                listening = False
                logger.info("%s shutdown requested: accepting no more tasks", self.stopping)
                consumer.stop_granting()
                if self.drain is not None and self.stopping == WARM:
                    self.drain.begin(time.monotonic())  # the sockets stay read: tasks go back as they come
                else:
                    for sock in polled:
                        poller.unregister(sock)
                    polled, reading_transport = set(), False
            if registered_generation != self.pool.generation:  # a child came or went
                registered_generation = self.pool.generation
                for fd in set(self.pool.by_fd) - registered:
                    poller.register(fd, zmq.POLLIN)
                    registered.add(fd)
                for fd in registered - set(self.pool.by_fd):
                    poller.unregister(fd)
                    registered.discard(fd)
            if polled_generation != consumer.generation:  # a producer found or gone in DNS (--connect)
                polled_generation = consumer.generation
                if reading_transport:
                    for sock in polled - set(consumer.sockets):
                        poller.unregister(sock)
                    for sock in set(consumer.sockets) - polled:
                        poller.register(sock, zmq.POLLIN)
                    polled = set(consumer.sockets)
            timeout = self._poll_timeout()
            if timeout > 0 and self.states.pending:
                # About to sleep: write states now. Under load the loop never sleeps
                # and states go out in batches (size or age bound) instead.
                self.states.flush(time.monotonic(), force=True)
                timeout = self._poll_timeout()
            # pyzmq's Poller.poll truncates a float itself (its annotation says int).
            events = poller.poll(timeout * 1000)  # type: ignore[arg-type]
            for target, _ in events:
                if target == self.signals.fd:
                    self.signals.drain()
                    if self._reopen_logs:
                        self._reopen_logs = False
                        from engine.worker.logs import reopen_log_files

                        logger.info("SIGHUP: reopened %d log file(s)", reopen_log_files())
                elif self.replies is not None and target == self.replies.wake_fd:
                    self.replies.relay()
                elif isinstance(target, int):
                    child = self.pool.by_fd.get(target)
                    if child is not None:
                        self._read_child(child)
                elif not self.stopping:
                    self._receive(target)
                elif self.drain is not None and self.drain.started:
                    for peer, _, raws in consumer.receive(target):
                        self.drain.send_back_frame(peer, raws)
                # Stopping: task frames stay unread and unacknowledged, so their clients
                # send them to another worker once this one is gone.
            if consumer.requests:
                requests, consumer.requests = consumer.requests, []
                for peer, request in requests:
                    self.control.handle(peer, request)
            if consumer.taken:
                taken, consumer.taken = consumer.taken, []
                if self.drain is not None:
                    for _, ids in taken:
                        self.drain.taken(ids)
            now = self.last_turn = time.monotonic()
            if self.stopping == COLD:
                return self._cold_stop()
            self._fire_timers()
            if self.journal is not None:
                self.journal.commit()  # on disk before the clients hear "acknowledged"
            consumer.flush()
            # Only now to the children: a task never runs before its client heard "acknowledged",
            # so a crash cannot leave a task that ran unacknowledged (sent again elsewhere: twice).
            self._dispatch()
            if not self.stopping:
                self._grant()
            self.states.flush(now)
            if self.events is not None:
                self.events.flush(now)
                if self.events.heartbeat_due(now):
                    self.events.worker("heartbeat", self._worker_figures())
            if self.chords is not None:
                self.chords.confirm()  # returns at once unless bodies wait to be confirmed
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            if self.stopping == WARM:
                if self.drain is not None and self.drain.started:
                    self.drain.tick(now)
                if not stop_sent and not self._holds_work() and (self.drain is None or self.drain.done()):
                    self.states.flush(now, force=True)
                    for child in self.pool.children.values():
                        child.accepting = False
                        child.writer.add(pipe.STOP, b"")
                        _safe_flush(child)
                    stop_sent = True
                    stop_deadline = now + STOP_GRACE
                if stop_sent and (not self.pool.children or now > stop_deadline):
                    return self._finish_warm()

    def _holds_work(self) -> bool:
        """True while tasks wait for a child or a child still holds some."""
        return bool(len(self.scheduler)) or any(c.outstanding for c in self.pool.children.values())

    def _poll_timeout(self) -> float:
        timeout = HOUSEKEEPING
        # Tasks still waiting after this turn's dispatch wait for a child to make room, which
        # a child's pipe event reports (no need to look at every child each turn), or for
        # the fair scheduler's hold on a long task to end.
        if self._held_back:
            timeout = HELD_RECHECK
        to_timer = self.timers.seconds_to_next()
        if to_timer is not None:
            timeout = min(timeout, to_timer)
        if self.states.pending:
            timeout = min(timeout, STATE_FLUSH_INTERVAL)
        return timeout

    # --- receiving -----------------------------------------------------------------

    def _receive(self, sock: zmq.Socket) -> None:
        consumer = self.consumer
        assert consumer is not None
        journal = self.journal
        # What accept() does for a task due now, of a known kind without a rate limit, while no
        # event, revocation or task_received receiver asks for more, is done here, in take_plain.
        plain = self.events is None and not self.revoked.entries and not signals.task_received.receivers
        remember = self.replies.remember if self.replies is not None else None
        watch = self.chords.watch if self.chords is not None else None
        for peer, frame, raws in consumer.receive(sock):
            # The frame as it came is the journal's row for all its tasks (one write per frame).
            ref = journal.add_frame(frame, len(raws), peer.route) if journal is not None else None
            # Counted against credit and acknowledged once per frame and queue, not per task.
            per_queue: dict[str, int] = {}
            ids: list[str] = []
            queued: list[QueuedTask] = []  # to the scheduler in one call, in their order
            received = 0
            index, count = 0, len(raws)
            try:
                while index < count:
                    if plain:  # the plain ones in one compiled step, up to one it leaves to the code below
                        taken = len(queued)
                        try:
                            index = take_plain(raws, index, self.registry, peer, ref, queued, ids, per_queue,
                                               remember, watch)
                        finally:  # what it queued, even should a receiver raise
                            received += len(queued) - taken
                        if index == count:
                            break
                    raw = raws[index]
                    index += 1
                    try:
                        message = decode_message(raw)
                    except MessageDecodeError as exc:
                        self.counters["malformed"] += 1
                        consumer.consumed_any(peer)  # it was sent against some credit: take it back
                        logger.warning("dropped a malformed task message from %s: %s", peer.name, exc)
                        if signals.task_rejected.receivers:
                            signals.task_rejected.send(sender=self, message=raw, exc=exc)
                        if journal is not None:
                            journal.remove([ref])
                        continue
                    queue = message.queue
                    per_queue[queue] = per_queue.get(queue, 0) + 1
                    ids.append(message.id)
                    if queued:  # the tasks before it go first
                        self.scheduler.push_many(queued)
                        queued = []
                    self.accept(message, raw, peer, journal_ref=ref)
            finally:
                self.counters["received"] += received
                if queued:
                    self.scheduler.push_many(queued)
            for queue, count in per_queue.items():
                consumer.consumed(peer, queue, count)
            if ids:
                consumer.ack(peer, ids)

    def accept(self, message: TaskMessage, raw: bytes, peer: Peer | None = None,
               journal_ref: JournalRef | None = None) -> None:
        """Take one decoded task message: fail unknown tasks, hold future ones, queue the rest.

        ``journal_ref`` is how the journal already knows the message (its frame, or
        its row from an earlier run); without one it gets a row of its own here.
        """
        self.counters["received"] += 1
        journal = self.journal
        if journal is not None and journal_ref is None:
            journal_ref = journal.add(_journal_key(message), raw)
        if self.replies is not None:
            self.replies.remember(message, peer)
        if self.chords is not None:
            self.chords.watch(message)
        if self.events is not None:
            self.events.task("received", message.id, message.task)
        if self.revoked.entries and self.revoked.matches(message):  # once per task: no call while none are
            self._revoked(message, journal_ref)
            return
        try:
            task = self.registry.lookup(message.task)
        except NotRegistered as exc:
            self.counters["unknown"] += 1
            logger.error("received unknown task %s[%s]: %s", message.task, message.id, exc)
            if signals.task_unknown.receivers:
                signals.task_unknown.send(sender=self, name=message.task, id=message.id, message=message, exc=exc)
            self.states.record(message.id, states.FAILURE, exc, f"NotRegistered: {exc}")
            if journal_ref is not None:
                self.states.finished(journal_ref)
            return
        if signals.task_received.receivers:
            signals.task_received.send(sender=self, request=task.request_class(message, task, hostname=self.hostname))
        entry = QueuedTask(message, raw, task, peer, journal_ref)
        due = message.eta
        if due is None or due <= time.time():  # its time has come: its rate limit's slot, if any
            due = self._rate_slot(entry) if task.rate_limit is not None else None
        if due is not None and due > time.time():
            if journal is not None and isinstance(journal_ref, int):
                # Held for later: a row of its own, so that its frame's row can go with the others.
                entry.journal_ref = journal.add(_journal_key(message), raw)
                journal.remove([journal_ref])
            self.timers.push(due, entry)
        else:
            self.scheduler.push(entry)

    def _rate_slot(self, entry: QueuedTask) -> float | None:
        """When ``entry`` may start under its kind's rate limit (None: now), its slot taken."""
        if entry.task.rate_limit is None or self.app.conf.worker_disable_rate_limits:
            return None
        rate = self.rate_limiter.rate_of(entry.task)
        if rate is None:
            return None
        now = time.time()
        slot = self.rate_limiter.reserve(entry.message.task, rate, now)
        if slot <= now:
            return None
        entry.rate_slot = True
        self.rate_held += 1  # counted against the credit window: a limited kind must not hoard
        return slot

    def take_from_timers(self, predicate: Callable[[QueuedTask], bool]) -> list[QueuedTask]:
        """Take the held tasks ``predicate`` picks out of the timer heap (their rate slots given up)."""
        taken = self.timers.remove_if(predicate)
        for entry in taken:
            if entry.rate_slot:
                entry.rate_slot = False
                self.rate_held -= 1
        return taken

    def _fire_timers(self) -> None:
        for entry in self.timers.pop_due():
            if entry.rate_slot:
                entry.rate_slot = False
                self.rate_held -= 1
            elif entry.task.rate_limit is not None:  # an ETA task whose time came: now its rate slot
                slot = self._rate_slot(entry)
                if slot is not None:
                    self.timers.push(slot, entry)
                    continue
            self.scheduler.push(entry)

    # --- children ------------------------------------------------------------------

    def _dispatch(self) -> None:
        if not len(self.scheduler):
            self._held_back = False
            return
        assigned = self.scheduler.assign(self.pool.children.values())
        self._held_back = not assigned and bool(len(self.scheduler))
        if not assigned:
            return
        now = time.monotonic()
        self.in_children += len(assigned)
        touched = write_assigned(assigned, now, pipe.TASK)
        if self.events is not None:  # each task that starts now is announced
            for child, entry in assigned:
                if child.outstanding[0] is entry:
                    self.events.task("started", entry.message.id, entry.message.task)
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

    def _handle_child_frames(self, child: Child, frames: list[tuple[int, bytes]]) -> None:
        done: list[bytes] = []  # DONE reports come by the hundred: a run of them is seen in one pass
        # The figures of the tasks these frames end reach the stats and the journal once, at the end
        # (with results, a child's frames alternate RECORD and DONE: runs of one report each).
        runs: dict[str, list[list]] = {}
        released: list[JournalRef] = []
        # A RECORD is of the task the child runs after the DONEs before it. Only replies (the task
        # whose route its states follow) and events (the failure of which task) need to know which:
        # without them a read's DONEs are applied together, after its RECORDs. A DONE still comes
        # after its task's states, which is all the journal's release needs (StateFlusher.flush).
        in_order = self.replies is not None or self.events is not None
        try:
            for kind, payload in frames:
                if kind == pipe.DONE:
                    done.append(payload)
                    continue
                if done and (in_order or kind != pipe.RECORD):
                    self._end_tasks(child, done, runs, released)
                    done = []
                if kind == pipe.RECORD:
                    task_id, state, body, traceback, timestamp = read_record(payload)
                    if self.replies is not None and child.outstanding:
                        self.replies.follow(task_id, child.outstanding[0].message.id)
                    if self.events is not None and state == states.FAILURE and traceback and child.outstanding \
                            and child.outstanding[0].message.id == task_id:  # not the later steps of its chain
                        self._failure_info[task_id] = traceback.strip().splitlines()[-1][:500]
                    self.states.record_encoded(task_id, state, body, traceback, timestamp)
                elif kind == pipe.SEND:
                    self._accept_from_child(payload)
            if done:
                self._end_tasks(child, done, runs, released)
        finally:
            self._count_runs(runs, released)

    def _task_done(self, child: Child, payload: bytes) -> None:
        """One DONE report of ``child`` (see :meth:`_tasks_done`)."""
        self._tasks_done(child, [payload])

    def _tasks_done(self, child: Child, payloads: list[bytes]) -> None:
        """DONE reports of ``child``, in the order it sent them: each ends the task it holds first."""
        runs: dict[str, list[list]] = {}
        released: list[JournalRef] = []
        try:
            self._end_tasks(child, payloads, runs, released)
        finally:
            self._count_runs(runs, released)

    def _end_tasks(self, child: Child, payloads: list[bytes], runs: dict[str, list[list]],
                   released: list[JournalRef]) -> None:
        """End the tasks ``child`` reported done; their figures go to ``runs`` and ``released`` (see _count_runs)."""
        outstanding = child.outstanding
        events = self.events
        now = time.monotonic()  # when the next task in the child started, as far as the supervisor knows
        requeued: list[QueuedTask] = []
        done = 0
        index, count = 0, len(payloads)
        try:
            while index < count:
                # With events, one report at a time: each ended task is announced, and the next one's start.
                end = count if events is None else index + 1
                held = len(outstanding)
                name = outstanding[0].message.task if events is not None and held else ""
                try:
                    index, _ = finish_done(child, payloads, index, end, now, runs, released, requeued)
                finally:
                    done += held - len(outstanding)  # what it ended, even should it raise
                if index == end:
                    if events is not None:
                        task_id, state, runtime, _, _ = read_done(payloads[index - 1])
                        events.task(_EVENT_OF.get(state, state.lower()), task_id, name, runtime,
                                    self._failure_info.pop(task_id, None))
                        if outstanding:
                            events.task("started", outstanding[0].message.id, outstanding[0].message.task)
                    continue
                # A report it could not apply: a malformed one raises here, one of a task not given is logged.
                payload = payloads[index]
                index += 1
                child.last_done = payload  # where this child's report log is read from should it die
                task_id, *_ = read_done(payload)
                logger.error("child %d reported %s it was not given", child.pid, task_id)
        finally:
            self.in_children -= done
            self.counters["done"] += done
            self.counters["requeued"] += len(requeued)
            for entry in requeued:
                self.scheduler.push(entry)

    def _count_runs(self, runs: dict[str, list[list]], released: list[JournalRef]) -> None:
        """Ended tasks' figures, per task name: to the task and run-time stats; their journal rows to release."""
        if released:  # first: a figure the stats refuse must not keep tasks in the journal
            self.states.finished_many(released)
        for name, (run_states, runtimes, waits) in runs.items():
            self.task_stats.finished_runs(name, run_states, runtimes, waits)
            # An expired or rejected task says nothing of its kind's run time.
            self.stats.add_runs(name, [runtime for state, runtime in zip(run_states, runtimes)
                                       if state not in NOT_RUN])

    def _accept_from_child(self, raw: bytes) -> None:
        try:
            message = decode_message(raw)
        except MessageDecodeError as exc:
            logger.error("a child sent a malformed message: %s", exc)
            return
        if message.queue in self.queues:
            self.accept(message, raw)
        else:
            # Another worker consumes that queue: this supervisor sends it on as a client,
            # and relays the states that worker sends back for the waiting client.
            if self.replies is not None:
                self.replies.listen(self.app.producer)
            self.app.send_message(message)

    def _child_exited(self, child: Child) -> None:
        status = self.pool.forget(child)
        reason = self.limits.reason(child.pid)
        target = self.limits.terminated_task(child.pid)
        report_file = child.report_log
        if report_file:
            # Not for a child killed on purpose (a time limit, a terminating revoke): the task
            # it was killed for is the one held first, whatever its log says since.
            if child.outstanding and reason is None and target is None:
                self._read_child_log(child, report_file)
            # Its log goes once what it reported is stored.
            self._dead_logs.append((self.states.stores, report_file))
        held = list(child.outstanding)
        child.outstanding.clear()
        child.queued_seconds = 0.0
        self.in_children = max(0, self.in_children - len(held))
        retiring = child.pid in self._retiring
        self._retiring.discard(child.pid)
        if (status == RETIRE_EXIT or (retiring and status == 0)) and reason is None:
            lost = None
            logger.info("child %d retired (task or memory limit, or a smaller pool)", child.pid)
        else:
            lost = held.pop(0) if held else None
            if reason and reason[0] == "revoked" and lost is not None and lost.message.id != target \
                    and not self.revoked.matches(lost.message):
                # The revoked task had ended just before the signal (its DONE unread): the one
                # killed is another, which never finished: it runs again, it is not REVOKED.
                logger.warning("child %d was terminated after revoked task %s ended: %s runs again",
                               child.pid, target, lost)
                held.insert(0, lost)
                lost = None
            elif not self.stopping or lost is not None:
                logger.error("child %d exited (status %s) while running %s", child.pid, status, lost)
        for entry in reversed(held):  # never started: run them elsewhere (unless revoked meanwhile)
            if self.revoked.matches(entry.message):
                self._revoked(entry.message, entry.journal_ref)
            else:
                self.scheduler.push_front(entry)
        if lost is not None:
            self._task_lost(lost, child.pid, status, reason)
        if len(self.pool.children) >= self.pool.concurrency:
            return  # a child retired by pool_shrink: not replaced
        if self.stopping is None or (self.stopping == WARM and (len(self.scheduler) or self.timers.any_due())):
            self.pool.spawn()  # during a warm stop too, while accepted work still waits

    def _read_child_log(self, child: Child, path: str) -> None:
        """Take from a dead child's report log what it reported and this supervisor did not read.

        Reports it wrote in its last milliseconds (in its log, not yet in its pipe,
        or in the pipe unread) say which of the tasks it held had finished: those
        are done, not run again. Fed through the pipe's own path, in order.
        """
        tail, ended = report_log.unread_tail(report_log.frames_of(path),
                                             [_journal_key(entry.message) for entry in child.outstanding],
                                             child.last_done)
        if ended:
            logger.info("child %d reported %d finished task(s) in its report log only: not run again",
                        child.pid, ended)
            self._handle_child_frames(child, tail)

    def _task_lost(self, entry: QueuedTask, pid: int, status: int | None, reason: tuple[str, float] | None) -> None:
        task, message = entry.task, entry.message
        if self.events is not None:
            self.events.task("revoked" if reason and reason[0] == "revoked" else "lost", message.id, message.task,
                             info=None if reason and reason[0] == "revoked" else f"child {pid} exited ({status})")
        if reason and reason[0] == "revoked":
            # Terminated on purpose (``revoke(terminate=True)``): REVOKED, not lost, and never run again.
            if signals.task_revoked.receivers:
                self._signal_revoked(message, terminated=True, signum=int(reason[1]))
            self.task_stats.decided(message.task, states.REVOKED)
            self.states.record(message.id, states.REVOKED, TaskRevokedError(f"terminated ({reason[1]})"),
                               f"TaskRevokedError: terminated ({reason[1]})")
            if entry.journal_ref is not None:
                self.states.finished(entry.journal_ref)
            return
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
        if not message.ignore_result:
            self.states.record(message.id, states.FAILURE, exc, f"{type(exc).__name__}: {exc}")
        if entry.journal_ref is not None:
            self.states.finished(entry.journal_ref)

    # --- revoking and resizing (control requests) ------------------------------------

    def _revoked(self, message: TaskMessage, journal_ref: JournalRef | None) -> None:
        """A revoked task that will not start: REVOKED is stored, the journal forgets it."""
        logger.info("discarding revoked task %s[%s]", message.task, message.id)
        if self.events is not None:
            self.events.task("revoked", message.id, message.task)
        if signals.task_revoked.receivers:
            self._signal_revoked(message, terminated=False, signum=None)
        self.task_stats.decided(message.task, states.REVOKED)
        self.states.record(message.id, states.REVOKED, TaskRevokedError("revoked"), "TaskRevokedError: revoked")
        if journal_ref is not None:
            self.states.finished(journal_ref)

    def _signal_revoked(self, message: TaskMessage, terminated: bool, signum: int | None) -> None:
        task = self.registry.get(message.task)
        request = task.request_class(message, task, hostname=self.hostname) if task is not None else None
        signals.task_revoked.send(sender=task, request=request, terminated=terminated, signum=signum, expired=False)

    def revoke(self, task_ids: list[str], root_ids: list[str], terminate_with: int | None = None) -> dict:
        """Revoke tasks by id and by root id: none of them starts here from now on.

        Tasks waiting for a child or for their time are taken out now, and a
        child holding some behind its running task is told to skip them; tasks
        that arrive later (from a client's outbox, a retry, the journal after a
        restart) are refused on arrival. A task already running goes on, unless
        ``terminate_with`` (a signal number) is given: its child gets the signal
        and is replaced. Returns the ids revoked before they started, those
        terminated, and those left running.
        """
        self.revoked.add(task_ids, root_ids)
        self._save_revoked()
        matches = self.revoked.matches
        taken = self.scheduler.remove_if(lambda entry: matches(entry.message))
        taken += self.take_from_timers(lambda entry: matches(entry.message))
        for entry in taken:
            self._revoked(entry.message, entry.journal_ref)
        revoked_ids = [entry.message.id for entry in taken]
        terminated, running = [], []
        for child in list(self.pool.children.values()):
            queued = []
            for index, entry in enumerate(child.outstanding):
                if not matches(entry.message):
                    continue
                if not (index == 0 and entry.started):
                    queued.append(entry.message.id)  # behind the running one: the child skips it
                elif terminate_with is not None and not self.limits.killing(child.pid):
                    logger.warning("terminating task %s[%s] (revoked): signal %d to child %d",
                                   entry.message.task, entry.message.id, terminate_with, child.pid)
                    self.limits.terminate(child, terminate_with, entry.message.id)
                    terminated.append(entry.message.id)
                else:
                    running.append(entry.message.id)
            if queued:
                # The child reads this before starting any of them (it looks in its pipe after
                # a long task); it reports them REVOKED, done without running.
                child.writer.add(pipe.REVOKE, msgpack.packb(queued))
                _safe_flush(child)
                revoked_ids += queued
        return {"revoked": revoked_ids, "terminated": terminated, "running": running}

    def _save_revoked(self) -> None:
        if self.journal is None or not self.revoked.changed:
            return
        added, removed = self.revoked.take_changes()
        try:
            self.journal.save_revoked(added, removed)
        except Exception as exc:  # kept in memory, and saved with the next changes
            self.revoked.give_back_changes(added, removed)
            logger.warning("could not save revoked task ids to %s (will retry): %s", self.journal_path, exc)

    def resize_pool(self, delta: int) -> int:
        """Add (``delta`` > 0) or retire (< 0) children; return the new pool size (at least 1)."""
        pool = self.pool
        target = max(1, pool.concurrency + delta)
        if target > pool.concurrency:
            pool.concurrency = target
            while len(pool.children) < target:
                pool.spawn()
        elif target < pool.concurrency:
            pool.concurrency = target
            active = [c for c in pool.children.values() if c.accepting and c.pid not in self._retiring]
            active.sort(key=lambda c: len(c.outstanding))  # idle ones first
            for child in active[:max(0, len(active) - target)]:
                child.accepting = False
                self._retiring.add(child.pid)
                child.writer.add(pipe.STOP, b"")  # after what it holds: those tasks still run
                _safe_flush(child)
        self.concurrency = pool.concurrency
        logger.info("pool resized to %d children", pool.concurrency)
        return pool.concurrency

    def _route_message(self, message: TaskMessage) -> None:
        """A message the supervisor itself sends (a chord's body): queued here when this worker consumes its queue."""
        if message.queue in self.queues:
            self.accept(message, encode_message(message))
            # Sent from a state flush, after this turn's dispatch: hand it to a child now, not
            # after the next poll (which may sleep until the next housekeeping pass).
            self._dispatch()
        else:
            self.app.producer.send(message)

    # --- credit and housekeeping -----------------------------------------------------

    def window(self) -> int:
        """Tasks this worker may hold or promise: about ``worker_queue_seconds`` of work per child."""
        low = self.concurrency * self.scheduler.depth()
        average = self.stats.overall
        if not average:
            return low  # nothing measured yet: stay small until run times are known
        wanted = self.concurrency * float(self.app.conf.worker_queue_seconds) / max(average, 1e-6)
        return int(max(low, min(WINDOW_MAX, wanted)))

    def _grant(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        if len(self.timers) >= MAX_TIMERS:
            return
        window = self.window()
        free = window - self.scheduler.held_for_credit(window) - self.in_children - consumer.outstanding() \
            - self.rate_held
        consumer.grant(free, standing=self.concurrency)

    def _remove_dead_logs(self) -> None:
        """Remove the report logs of children gone whose reports are all stored (or replied) now."""
        stored_all = not self.states.pending
        kept = []
        for stores, path in self._dead_logs:
            if stored_all or stores < self.states.stores:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            else:
                kept.append((stores, path))
        self._dead_logs = kept

    def _housekeeping(self, now: float) -> None:
        assert self.consumer is not None
        self._next_housekeeping = now + HOUSEKEEPING
        self.consumer.expire(now)
        if not self.stopping:
            self.consumer.refresh_links(now)
        self.consumer.reclaim_idle(now)
        if self._dead_logs:
            self._remove_dead_logs()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT
            self.consumer.heartbeat()
        if now >= self._next_cleanup and hasattr(self.backend, "cleanup"):
            self._next_cleanup = now + CLEANUP_EVERY
            try:
                removed = self.backend.cleanup()  # type: ignore[union-attr]  # hasattr() above: not None
                if removed:
                    logger.info("removed %d result(s) older than result_expires", removed)
            except Exception as exc:
                logger.warning("result cleanup failed: %s", exc)
        if now >= self._next_runtimes_save:
            self._next_runtimes_save = now + RUNTIMES_SAVE_EVERY
            self._save_runtimes()
            self.revoked.purge()
            self._save_revoked()
        if self.replies is not None:
            self.replies.prune()
        if self.chords is not None:
            self.chords.retry()
            self.chords.prune(now)
            if now >= self._next_chord_adopt:
                self._next_chord_adopt = now + CHORD_ADOPT_EVERY
                self.chords.adopt()
        children = list(self.pool.children.values())
        if self.autoscaler is not None and not self.stopping:
            self.autoscaler.tick(now)
        self.limits.enforce(now, children)
        for child in children:
            if child.writer.pending and not self.limits.killing(child.pid):
                _safe_flush(child)
        if now >= self._next_stray_check:
            self._next_stray_check = now + STRAY_CHECK
            self._reap_strays()

    def _reap_strays(self) -> None:
        # A child whose pipe we missed closing still gets reaped and replaced.
        for child in list(self.pool.children.values()):
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

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._reopen_logs = True

    def _worker_figures(self) -> dict:
        """What a worker event carries: pool, queue and counter figures."""
        children = list(self.pool.children.values())
        return {"children": len(children), "busy": self.pool.busy(),
                "waiting": len(self.scheduler), "scheduled": len(self.timers), "in_children": self.in_children,
                "counters": self.task_stats.counters(), "received": self.counters["received"],
                "waits": self.task_stats.mean_waits()}

    def _close(self) -> None:
        gc.unfreeze()  # start() froze the heap: a process that embeds the worker goes on with it whole
        signals.worker_shutdown.send(sender=self)
        if self.events is not None:
            self.events.worker("offline", self._worker_figures())
            self.events.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.states.flush(time.monotonic(), force=True)
        if self.app._producer is not None:  # messages forwarded to queues other workers consume
            flushed = self.app._producer.flush(FORWARD_FLUSH_TIMEOUT)
            self.app._producer.close(timeout=0)
            self.app._producer = None
            if flushed and self.drain is not None and self.drain.forwarded:
                self.drain.release_forwarded()  # acknowledged by another worker: not ours to keep
                self.states.flush(time.monotonic(), force=True)
        if self.journal is not None:
            self._save_runtimes()
            self._save_revoked()
            self.journal.close()
        if self.report_dir:
            self._remove_dead_logs()
            try:
                os.rmdir(self.report_dir)  # empty once every child was reaped and its reports stored
            except OSError:
                pass
        if self.consumer is not None:
            self.consumer.flush()
            self.consumer.close()
        if self.context is not None:
            self.context.term()
        if self.backend is not None:
            self.backend.close()
        if self.replies is not None:
            self.replies.close()
        self.rate_limiter.close()
        self.signals.uninstall()


def _journal_key(message: TaskMessage) -> str:
    # A retry reuses the task id: the attempt number keeps the retry's entry apart from
    # the attempt that is finishing.
    return report_log.attempt_key(message.id, message.retries)


def _safe_flush(child: Child) -> None:
    try:
        child.writer.flush()
    except OSError:
        pass  # the child is gone; its EOF is handled when read
