"""Chords in the worker: header tasks counted as their final states are stored; each body started once.

A header task carries its chord's id (the body's task id) in its message
options. Once the supervisor's state flusher has stored a batch, the
:class:`ChordCounter` counts the header tasks of that batch that are final in
the results store, which counts each task id once and hands each completed
chord to one caller only (see ``Backend.chord_parts_done``). That caller
reads the header's results in order and sends the body with them; a failed
header task fails the chord with :class:`~engine.exceptions.ChordError`.

The results this worker stored itself are kept (up to :data:`CACHE_BYTES`)
until their chord completes, so the worker that ran the header reads only
what other workers ran: reading thousands of results back from the store
would delay the body by tens of milliseconds.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from engine import states
from engine.canvas import maybe_signature
from engine.exceptions import ChordError

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.backends.base import Backend
    from engine.core import StateRecord, TaskMessage
    from engine.worker.state_flusher import StateFlusher

__all__ = ("ChordCounter",)

logger = logging.getLogger("engine.worker")

#: Most bytes of encoded header results kept for chords not completed yet (past it, they are read back).
CACHE_BYTES = 64 * 1024 * 1024
#: Seconds a chord's kept results stay without a new part (another worker may complete it).
CACHE_SECONDS = 600.0


class ChordCounter:
    """Header tasks this worker runs, counted in the store when final; bodies sent through ``send``."""

    def __init__(self, app: Engine, backend: Backend, states_out: StateFlusher,
                 send: Callable[[TaskMessage], None], firer: str | None = None) -> None:
        self.app = app
        self.backend = backend
        self.states = states_out
        #: How a body's message leaves: the supervisor queues it here or sends it on.
        self.send = send
        #: This worker's durable identity (its host and journal), None without a journal: a chord
        #: completed here is noted as fired by it until its body is queued durably (see confirm()).
        self.firer = firer
        #: The identity an earlier version gave this worker (its journal's path): what it was
        #: firing becomes this worker's at start (see recover()).
        self.legacy_firer: str | None = None
        #: Chords whose body (or failure) went out and is not confirmed durable yet: (chord id, the
        #: journal's commit count and the state flusher's store count when it went out).
        self._sent: list[tuple[str, int, int]] = []
        #: Completed chords whose body could not be started (a store or transport error): tried again.
        self._unstarted: list[tuple[str, list[str], dict]] = []
        #: Header task id -> chord id, until its final state is stored and counted.
        self._chord_of: dict[str, str] = {}
        #: Parts stored but not counted yet (the count failed; tried again after the next store).
        self._parts: list[tuple[str, str]] = []
        #: Chord id -> (header task id -> its stored record), for chords not completed yet.
        self._kept: dict[str, dict[str, StateRecord]] = {}
        self._kept_bytes = 0
        #: Chord id -> when it last got a part (old ones are dropped: another worker completed them).
        self._kept_since: dict[str, float] = {}

    def watch(self, message: TaskMessage) -> None:
        """Note a received message that is a header task of a chord."""
        chord_id = message.options.get("chord")
        if chord_id:
            self._chord_of[message.id] = chord_id

    def stored(self, records: list[StateRecord]) -> None:
        """After a store: count the final header tasks; start the body of each chord this completes."""
        chord_of = self._chord_of
        now = time.monotonic()
        for record in records:
            if record.state in states.READY_STATES:
                chord_id = chord_of.pop(record.task_id, None)
                if chord_id is not None:
                    self._parts.append((chord_id, record.task_id))
                    self._keep(chord_id, record, now)
        self.retry()

    def _keep(self, chord_id: str, record: StateRecord, now: float) -> None:
        size = len(record.result or b"") + 100  # about what the record holds besides its result
        if self._kept_bytes + size > CACHE_BYTES:
            return  # read back from the store when the chord completes
        self._kept.setdefault(chord_id, {})[record.task_id] = record
        self._kept_since[chord_id] = now
        self._kept_bytes += size

    def _take_kept(self, chord_id: str) -> dict[str, StateRecord]:
        kept = self._kept.pop(chord_id, {})
        self._kept_since.pop(chord_id, None)
        self._kept_bytes -= sum(len(record.result or b"") + 100 for record in kept.values())
        return kept

    def prune(self, now: float) -> None:
        """Drop the results kept for chords that got no part for :data:`CACHE_SECONDS`."""
        for chord_id, since in list(self._kept_since.items()):
            if now - since > CACHE_SECONDS:
                self._take_kept(chord_id)

    def all_counted(self) -> bool:
        """True unless parts wait for a count that failed (their tasks then stay in the journal)."""
        return not self._parts

    def retry(self) -> None:
        """Count the parts whose count failed before, start the bodies that failed to start (housekeeping)."""
        if self._unstarted:
            unstarted, self._unstarted = self._unstarted, []
            if self.firer is not None:
                # Failing this long, this worker may have gone silent and its chords taken over.
                try:
                    owned = {chord_id for chord_id, _, _ in self.backend.chords_firing(self.firer)}
                except Exception as exc:
                    logger.error("could not read the chords this worker fires, will retry: %s", exc)
                    self._unstarted[:0] = unstarted
                    return
                unstarted = [entry for entry in unstarted if entry[0] in owned]
            for chord_id, header_ids, body in unstarted:
                self._fire(chord_id, header_ids, body)
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        try:
            completed = self.backend.chord_parts_done(parts, self.firer)
        except Exception as exc:
            logger.error("could not count %d chord header task(s), will retry: %s", len(parts), exc)
            self._parts[:0] = parts
            return
        for chord_id, header_ids, body in completed:
            self._fire(chord_id, header_ids, body)

    def _fire(self, chord_id: str, header_ids: list[str], body: dict) -> None:
        try:
            self._start_body(chord_id, header_ids, body)
        except Exception:
            # Still marked as being fired: tried again at the next housekeeping pass.
            logger.exception("could not start the body of chord %s, will retry", chord_id)
            self._unstarted.append((chord_id, header_ids, body))
            return
        if self.firer is not None:
            self._sent.append((chord_id, self.commits(), self.states.stores))

    def commits(self) -> int:
        """The journal's count of commits (0 without a journal)."""
        journal = self.states.journal
        return journal.commits if journal is not None else 0

    def confirm(self, producer_idle: bool | None = None) -> None:
        """Tell the store which bodies sent are queued for good: nothing to recover for them any more.

        A body is durable once a journal commit and a state store happened after
        it was sent (its journal row, or its chord's failure state, is written)
        and no message this worker forwards (a body for a queue another worker
        serves) waits for an acknowledgement. Until then a crash leaves the chord
        "being fired by this worker", and :meth:`recover` sends it again at restart.
        """
        if not self._sent:
            return
        if producer_idle is None:  # a body for a queue another worker serves went through the app's producer
            producer = self.app._producer
            producer_idle = producer is None or not producer.waiting
        if not producer_idle:
            return
        journal = self.states.journal
        commits, stores = self.commits(), self.states.stores
        journal_clean = journal is None or not journal.dirty
        states_clean = not self.states.pending
        done = [entry for entry in self._sent if (commits > entry[1] or journal_clean)
                and (stores > entry[2] or states_clean)]
        if not done:
            return
        try:
            self.backend.chord_bodies_queued([chord_id for chord_id, _, _ in done], self.firer)  # type: ignore[arg-type]
        except Exception as exc:
            logger.warning("could not mark %d chord bodies queued, will retry: %s", len(done), exc)
            return
        confirmed = {id(entry) for entry in done}
        self._sent = [entry for entry in self._sent if id(entry) not in confirmed]

    def recover(self, replayed_ids: set[str]) -> None:
        """At start: send again the bodies of chords this worker completed but did not queue for good.

        A body the journal replayed (its task id is the chord id) is queued already.
        """
        if self.firer is None:
            return
        try:
            self.backend.firer_alive(self.firer)  # before it fires anything: its chords are not taken over
            if self.legacy_firer is not None and self.legacy_firer != self.firer:
                self.backend.chords_take_over(self.legacy_firer, self.firer)
            firing = self.backend.chords_firing(self.firer)
        except Exception as exc:
            logger.error("could not look for chords left being fired by this worker: %s", exc)
            return
        for chord_id, header_ids, body in firing:
            if chord_id in replayed_ids:
                self._sent.append((chord_id, self.commits(), self.states.stores))
                continue
            logger.warning("sending again the body of chord %s, completed before this worker stopped", chord_id)
            self._fire(chord_id, header_ids, body)

    def adopt(self) -> None:
        """Say this worker is alive; send the bodies of chords whose firing worker is gone (housekeeping).

        A worker that completed a chord and was then lost for good (its pod
        replaced, its disk gone) never sends the body: after ``FIRER_TTL``
        seconds of silence another worker takes the chord over, once.
        """
        if self.firer is None:
            return
        try:
            self.backend.firer_alive(self.firer)
            abandoned = self.backend.chords_abandoned(self.firer)
        except Exception as exc:
            logger.warning("could not look for chords abandoned by a lost worker: %s", exc)
            return
        for chord_id, header_ids, body in abandoned:
            logger.warning("sending the body of chord %s: the worker that completed it is gone", chord_id)
            self._fire(chord_id, header_ids, body)

    def _start_body(self, chord_id: str, header_ids: list[str], body: dict) -> None:
        """Send the body with the header's results in order, or fail the chord with the first failed task."""
        found = self._take_kept(chord_id)
        missing = [task_id for task_id in header_ids if task_id not in found]
        if missing:  # run by other workers, or past the memory bound
            found.update(self.backend.get_many_encoded(missing))
        values = []
        immutable = bool(body.get("immutable"))
        for task_id in header_ids:
            record = found.get(task_id)
            if record is None or record.state != states.SUCCESS:
                result = self.backend.decode(record).result if record is not None else None
                error = ChordError(f"Dependency {task_id} raised {result!r}")
                logger.error("chord %s failed: %s", chord_id, error)
                self.states.record(chord_id, states.FAILURE, error, f"ChordError: {error}")
                return
            if not immutable:  # an immutable body ignores the results: not decoded for nothing
                values.append(self.backend.decode(record).result)
        # Built as a client builds it (routing, options), then handed to ``send``.
        self.app.send_message = self.send  # type: ignore[method-assign,assignment]  # for this one send
        try:
            maybe_signature(body, app=self.app).apply_async((values,))
        finally:
            del self.app.send_message
