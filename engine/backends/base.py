"""The interface every result backend implements, and the disabled backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from engine import states
from engine.core import StateRecord, decode_results
from engine.exceptions import ResultsDisabledError, TimeoutError
from engine.serialization import dumps, loader, loads

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("Backend", "DisabledBackend")

#: First and largest sleep between two polls of ``wait_for`` (seconds).
POLL_FIRST = 0.0002
POLL_MAX = 0.5
#: Ids not ready yet that one read of ``wait_for_many`` asks for at most (the first ones, in order) ...
WAIT_AHEAD = 1000
#: ... and at least: in between, about as many as the last read found ready, and a quarter more.
WAIT_AHEAD_MIN = 64
#: Seconds a chord-firing worker counts as alive after it last said so (``Backend.firer_alive``).
FIRER_TTL = 60.0


class Backend:
    """Stores the latest StateRecord per task id.

    Writers call :meth:`store` with batches of *encoded* records (``result``
    is the bytes of :func:`engine.serialization.dumps`, as the worker's
    recorder holds them); readers call :meth:`get` (decoded records),
    :meth:`wait_for` and :meth:`forget`. Subclasses implement ``store``,
    ``get_encoded`` and ``forget``.
    """

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        self.url = url
        self.app = app
        self.accept_pickle = bool(app.conf.accept_pickle) if app is not None else False

    #: True when chords can be counted here by every worker (a store they share).
    supports_chords = False

    def store(self, records: Iterable[StateRecord]) -> None:
        """Store a batch of encoded records, keeping one final state per task id."""
        raise NotImplementedError

    def chord_start(self, chord_id: str, header_ids: list[str], body: dict) -> None:
        """Remember a chord: its header task ids, in order, and its body (a signature as a dict)."""
        raise NotImplementedError(f"{type(self).__name__} does not support chords")

    def chord_parts_done(self, parts: list[tuple[str, str]],
                         firer: str | None = None) -> list[tuple[str, list[str], dict]]:
        """Count header tasks ``(chord id, task id)`` whose final state is stored (each id once).

        Returns ``(chord id, header ids, body)`` of every chord this call completed:
        each chord is returned to one caller only, whichever completes it. With
        ``firer`` (a worker's durable identity) the chord is noted as being fired
        by it until :meth:`chord_bodies_queued`, so that worker, restarted after
        a crash in between, finds it again with :meth:`chords_firing`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support chords")

    def chord_bodies_queued(self, chord_ids: list[str], firer: str) -> None:
        """The bodies of these chords, fired by ``firer``, are queued durably: nothing to recover."""
        raise NotImplementedError(f"{type(self).__name__} does not support chords")

    def chords_firing(self, firer: str) -> list[tuple[str, list[str], dict]]:
        """Chords ``firer`` completed whose bodies it never reported queued: ``(chord id, header ids, body)``."""
        raise NotImplementedError(f"{type(self).__name__} does not support chords")

    def firer_alive(self, firer: str) -> None:
        """Note that the worker ``firer`` lives: for :data:`FIRER_TTL` seconds its chords are not taken over.

        (A store without it, here: nothing is noted, and nothing is ever taken over.)
        """

    def chords_take_over(self, from_firer: str, firer: str) -> list[tuple[str, list[str], dict]]:
        """Note the chords ``from_firer`` is firing as fired by ``firer``; return them as :meth:`chords_firing` does."""
        return []

    def chords_abandoned(self, firer: str) -> list[tuple[str, list[str], dict]]:
        """Take over the chords being fired by workers not alive any more; return them as :meth:`chords_firing` does.

        A worker that completed a chord and never came back (a pod replaced,
        its disk gone) would otherwise leave the body unsent. Each abandoned
        chord goes to one caller only, noted as fired by ``firer`` from now on.
        A worker counts as gone when it said it was alive (:meth:`firer_alive`)
        and then did not for :data:`FIRER_TTL` seconds; one that never said so
        (a worker of an earlier version) is never taken over from.
        """
        return []

    def get_encoded(self, task_id: str) -> StateRecord | None:
        """Return the stored record of ``task_id`` with its result still encoded, or None."""
        raise NotImplementedError

    def forget(self, task_id: str) -> None:
        """Remove what is stored for ``task_id``."""
        raise NotImplementedError

    def forget_many(self, task_ids: Sequence[str]) -> None:
        """Remove what is stored for every one of ``task_ids`` (one call per id here; bulk where the store can)."""
        for task_id in task_ids:
            self.forget(task_id)

    def get_many_encoded(self, task_ids: Sequence[str]) -> dict[str, StateRecord]:
        """The stored records of those of ``task_ids`` that have one, results still encoded.

        One read per id here; backends that can read many ids at once (one SQL
        query, one Redis pipeline) override it, and every bulk read (group
        results) goes through it.
        """
        found = {}
        for task_id in task_ids:
            record = self.get_encoded(task_id)
            if record is not None:
                found[task_id] = record
        return found

    def get(self, task_id: str) -> StateRecord | None:
        """Return the stored record of ``task_id`` (result decoded), or None (PENDING)."""
        record = self.get_encoded(task_id)
        if record is None:
            return None
        return self.decode(record)

    def decode(self, record: StateRecord) -> StateRecord:
        """``record`` with its result decoded."""
        result = record.result
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = loads(bytes(result), self.accept_pickle)
        return StateRecord(record.task_id, record.state, result, record.traceback, record.timestamp)

    def decode_many(self, records: dict[str, StateRecord]) -> dict[str, StateRecord]:
        """:meth:`decode` of each record, by id (a group's results: one loop, no call per record)."""
        if type(self).decode is not Backend.decode:  # a backend's own decoding is kept
            return {task_id: self.decode(record) for task_id, record in records.items()}
        return decode_results(records, loader(self.accept_pickle))

    def store_state(self, task_id: str, state: str, result: Any = None, traceback: str | None = None) -> None:
        """Store one state now (``update_state`` outside a worker-run call)."""
        self.store([StateRecord(task_id, state, dumps(result, self.accept_pickle), traceback, time.time())])

    def wait_for_many(self, task_ids: Sequence[str], timeout: float | None = None,
                      interval: float = POLL_MAX,
                      on_ready: Callable[[int], None] | None = None) -> dict[str, StateRecord]:
        """Wait until every one of ``task_ids`` is ready; return their decoded records by id.

        Results mostly finish in the order they were sent, so each read asks
        only for the first ids not ready yet (one bulk read,
        :meth:`get_many_encoded`), not for all of them: waiting on a group of
        100,000 costs what waiting on 1,000 does. How many it asks for follows
        how many the last read found (between :data:`WAIT_AHEAD_MIN` and
        :data:`WAIT_AHEAD`), so that a worker storing states in small batches
        is not answered with reads of many ids still pending. Between reads it waits for the
        store to change (:meth:`_wait_for_change`), with a backoff that starts
        again whenever one became ready. ``on_ready(n)`` is called each time
        ``n`` more became ready (progress). Raises
        ``engine.exceptions.TimeoutError`` (naming how many were not ready)
        when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        ready: dict[str, StateRecord] = {}
        head = 0  # every id before it is ready
        window = min(WAIT_AHEAD_MIN, WAIT_AHEAD)
        sleep = POLL_FIRST
        while True:
            while head < len(pending) and pending[head] in ready:
                head += 1
            if head == len(pending):
                return self.decode_many(ready)
            ahead = [task_id for task_id in pending[head:head + window] if task_id not in ready]
            token = self._change_token()  # before the read: a change during it is not missed
            found = self.get_many_encoded(ahead)
            done = {task_id: record for task_id, record in found.items() if record.state in states.READY_STATES}
            if done:
                ready.update(done)
                sleep = POLL_FIRST
                if on_ready is not None:
                    on_ready(len(done))
                if len(done) == len(ahead):
                    window = min(window * 2, WAIT_AHEAD)
                    continue  # the whole window was ready: read the next one (larger) at once
                window = min(WAIT_AHEAD, max(WAIT_AHEAD_MIN, len(done) + len(done) // 4))
            if deadline is not None and time.monotonic() >= deadline:
                missing = len(pending) - len(ready)
                first = next(task_id for task_id in pending if task_id not in ready)
                raise TimeoutError(f"{missing} of {len(pending)} results were not ready "
                                   f"within {timeout}s (the first: task {first})")
            # A backend that can tell a change is waited on up to ``interval``; the others are polled.
            pause = min(sleep, interval) if token is None else interval
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            self._wait_for_change(pause, token)
            sleep *= 1.5

    def _change_token(self) -> Any:
        """Something that differs once new results were stored (None: this backend cannot tell)."""
        return None

    def _wait_for_change(self, seconds: float, token: Any) -> None:
        """Wait up to ``seconds`` for results stored after ``token`` was taken (here: just sleep)."""
        time.sleep(seconds)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = POLL_MAX
                 ) -> StateRecord:
        """Wait until ``task_id`` is ready and return its record (polling with backoff).

        Raises ``engine.exceptions.TimeoutError`` when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = POLL_FIRST
        while True:
            record = self.get(task_id)
            if record is not None and record.state in states.READY_STATES:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the result of task {task_id} was not ready within {timeout}s")
            pause = min(sleep, interval)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            sleep *= 1.5

    def close(self) -> None:
        """Release connections and files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url!r}>"


class DisabledBackend(Backend):
    """The backend of an app configured without one: every read says results are off."""

    def _disabled(self, *args: Any, **kwargs: Any) -> Any:
        raise ResultsDisabledError(
            "no result backend is configured: pass Engine(backend=...) (e.g. 'sqlite:///results.db') "
            "or set app.conf.result_backend to read task results")

    store = get = get_encoded = forget = wait_for = store_state = _disabled
