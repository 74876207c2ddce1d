"""``engine-worker --shutdown-timeout S``: a warm shutdown with a deadline that leaves nothing behind.

On SIGTERM (a scale-down, a pod deletion) the worker stops taking work, and
hands every task it accepted but has not started (waiting for a child, held
for its ETA or a retry delay) back to the client that sent it (a ``B``
frame; the client sends it on to another worker and answers with the ids it
took, a ``K`` frame). A task frame that arrives meanwhile goes back the same
way. Running tasks may finish until the deadline; then their children are
killed, as in a cold shutdown, and those tasks are handed back too (they run
again elsewhere: at-least-once). A task is released only once its client
took it, so a drained worker's journal is empty and a pod losing its disk
loses nothing.

A task that came from no client (a retry, a next chain step or subtask a
task sent, a journal replay, a chord body) runs here if it can start before
the deadline; otherwise the supervisor sends it on to another worker as a
client would, and it leaves the journal once that worker acknowledged it. A
task whose client does not answer within :data:`TAKE_WAIT` seconds is sent
on the same way.

Tasks already written to a child's pipe behind its running task (at most
about ``worker_queue_seconds`` of work) run before the worker exits.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from engine.transport import protocol

if TYPE_CHECKING:
    from engine.transport.protocol import Peer
    from engine.worker.scheduler import QueuedTask
    from engine.worker.supervisor import Supervisor

__all__ = ("Drain",)

logger = logging.getLogger("engine.worker")

#: Seconds a client has to say it took tasks handed back before they stay in the journal.
TAKE_WAIT = 5.0
#: Tasks per handed-back frame.
FRAME_TASKS = 512


class Drain:
    """Hands a stopping worker's unstarted tasks back to their clients, within a deadline."""

    def __init__(self, supervisor: Supervisor, timeout: float) -> None:
        self.supervisor = supervisor
        self.timeout = timeout
        self.deadline = 0.0
        self.started = False
        #: Task id -> (the entry handed back, when): released once its client took it.
        self.handed: dict[str, tuple[QueuedTask, float]] = {}
        #: Entries sent on to another worker through the supervisor's own producer: released
        #: from the journal once it flushed (see :meth:`forwarded_refs`).
        self.forwarded: list[QueuedTask] = []

    def begin(self, now: float) -> None:
        """Start draining: everything waiting goes back to its client."""
        self.started = True
        self.deadline = now + self.timeout
        sup = self.supervisor
        consumer = sup.consumer
        has_client = lambda entry: entry.peer is not None and consumer is not None and entry.peer in consumer.peers  # noqa: E731
        wall_deadline = time.time() + self.timeout
        entries = sup.scheduler.remove_if(has_client) + sup.take_from_timers(has_client)
        # From no client: run here if it can start in time, else sent on to another worker.
        self.forward(sup.take_from_timers(lambda entry: (entry.message.eta or 0.0) >= wall_deadline))
        logger.warning("draining: %d task(s) not started go back to their clients; running ones have %.0fs",
                       len(entries), self.timeout)
        self.hand_back(entries, now)

    def hand_back(self, entries: list[QueuedTask], now: float) -> None:
        """Send ``entries`` back to the clients that sent them (those without one are sent on)."""
        by_peer: dict[int, tuple[Peer, list[QueuedTask]]] = {}
        consumer = self.supervisor.consumer
        for entry in entries:
            peer = entry.peer
            if peer is None or consumer is None or peer not in consumer.peers:
                self.forward([entry])
                continue
            by_peer.setdefault(id(peer), (peer, []))[1].append(entry)
        for peer, items in by_peer.values():
            for start in range(0, len(items), FRAME_TASKS):
                chunk = items[start:start + FRAME_TASKS]
                if peer.try_send(protocol.RETURN, protocol.pack([entry.raw for entry in chunk])):
                    for entry in chunk:
                        self.handed[entry.message.id] = (entry, now)
                else:
                    self.forward(chunk)  # its client's queue is full

    def forward(self, entries: list[QueuedTask]) -> None:
        """Send ``entries`` to another worker through the supervisor's producer (as a client would)."""
        if not entries:
            return
        producer = self.supervisor.app.producer
        for entry in entries:
            producer.send(entry.message)
            self.forwarded.append(entry)
        logger.warning("draining: %d task(s) from no client sent on to another worker", len(entries))

    def send_back_frame(self, peer: Peer, raws: list[bytes]) -> None:
        """Task messages that arrived while draining: straight back to their client (never journaled)."""
        if raws:
            peer.try_send(protocol.RETURN, protocol.pack(raws))  # a batch frame, as the producer packs one

    def taken(self, ids: list[str]) -> None:
        """A client took these back: the journal forgets them."""
        states = self.supervisor.states
        for task_id in ids:
            handed = self.handed.pop(task_id, None)
            if handed is not None and handed[0].journal_ref is not None:
                states.finished(handed[0].journal_ref)

    def tick(self, now: float) -> None:
        """Past the deadline: stop running tasks and hand them back; give up waiting on silent clients."""
        sup = self.supervisor
        if now >= self.deadline:
            for child in list(sup.pool.children.values()):
                sup._read_child(child)  # a task that just finished is not handed back to run again
            leftover = sup.scheduler.remove_if(lambda entry: True) + sup.take_from_timers(lambda entry: True)
            self.hand_back(leftover, now)
            busy = [child for child in sup.pool.children.values() if child.outstanding]
            if busy:
                logger.warning("drain deadline: stopping %d running task(s); they go back to their clients",
                               sum(len(child.outstanding) for child in busy))
                entries = []
                for child in busy:
                    entries += list(child.outstanding)
                    child.outstanding.clear()
                    child.accepting = False
                    sup.pool.kill(child)
                sup.in_children = 0
                self.hand_back(entries, now)
        silent = [entry for task_id, (entry, when) in list(self.handed.items()) if now - when > TAKE_WAIT]
        for entry in silent:
            del self.handed[entry.message.id]
        if silent:
            logger.warning("draining: %d task(s) handed back were not taken by their client", len(silent))
            self.forward(silent)

    def done(self) -> bool:
        """True once every task handed back was taken and nothing waits for its time here."""
        return not self.handed and not len(self.supervisor.timers)

    def release_forwarded(self) -> None:
        """The producer flushed: the tasks sent on are another worker's now (the journal forgets them)."""
        states = self.supervisor.states
        for entry in self.forwarded:
            if entry.journal_ref is not None:
                states.finished(entry.journal_ref)
        self.forwarded = []

