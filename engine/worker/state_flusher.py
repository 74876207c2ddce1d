"""Task states on their way out of the worker, in batches.

Children report states (STARTED, SUCCESS, custom ones ...) and the supervisor
adds its own (a lost child's task, an unknown task). They collect in a state
recorder, which applies the precedence rule, and leave in one batch: to the
result backend, or back to the waiting clients for ``rpc://``. Only once a
task's final state is out may the journal forget the task, so a worker
killed in between runs it again rather than losing its result.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from engine.core import StateRecorder
from engine.serialization import dumps

if TYPE_CHECKING:
    from engine.backends.base import Backend
    from engine.worker.journal import Journal, JournalRef
    from engine.worker.replies import ReplyRouter

__all__ = ("StateFlusher",)

logger = logging.getLogger("engine.worker")

#: Longest a state waits in the recorder before it is written out (seconds).
STATE_FLUSH_INTERVAL = 0.02
#: States written in one batch at most.
BATCH_SIZE = 512
#: Task states remembered for precedence. Kept small: each holds an encoded result, and the
#: backends (or the clients, for rpc://) hold the real copies.
RECORDER_ENTRIES = 10_000


class StateFlusher:
    """Collects task states and writes them out; releases finished tasks from the journal."""

    def __init__(self, backend: Backend | None = None, replies: ReplyRouter | None = None,
                 journal: Journal | None = None) -> None:
        #: Where states go: ``replies`` (rpc://) when given, else ``backend``; with neither, nowhere.
        self.backend = backend
        self.replies = replies
        self.journal = journal
        self.recorder = StateRecorder(batch_size=BATCH_SIZE, max_entries=RECORDER_ENTRIES)
        #: Called with each batch of records once the backend stored it (the supervisor counts chords there).
        self.after_store: Callable[[list[Any]], None] | None = None
        #: False while finished tasks must stay in the journal although their states are stored
        #: (a chord count that failed: replayed after a crash, they are counted then).
        self.may_release: Callable[[], bool] | None = None
        #: Journal keys of tasks that ran; they leave the journal once their states are out.
        self._finished: list[JournalRef] = []
        self._last_flush = 0.0
        #: Batches written out (what was recorded before one of them is stored).
        self.stores = 0

    @property
    def pending(self) -> bool:
        """True when states wait to be written."""
        return bool(self.recorder.pending)

    def record(self, task_id: str, state: str, result: Any, traceback: str | None) -> None:
        """Record a state the supervisor decided (its result not yet serialized)."""
        self.recorder.record(task_id, state, dumps(result), traceback, time.time())

    def record_encoded(self, task_id: str, state: str, body: bytes, traceback: str | None,
                       timestamp: float) -> None:
        """Record a state a child reported (its result already serialized)."""
        self.recorder.record(task_id, state, body, traceback, timestamp)

    def finished(self, journal_ref: JournalRef) -> None:
        """A task ran (or failed for good): the journal forgets it once its states are out."""
        self._finished.append(journal_ref)

    def finished_many(self, journal_refs: list[JournalRef]) -> None:
        """Tasks ran (see :meth:`finished`)."""
        self._finished += journal_refs

    def flush(self, now: float, force: bool = False) -> None:
        """Write pending states when the batch is full, old enough, or ``force``; then release tasks."""
        recorder = self.recorder
        if not recorder.pending:
            self._release(self._take_finished())
            return
        if not force and not recorder.should_flush and now - self._last_flush < STATE_FLUSH_INTERVAL:
            return
        self._last_flush = now
        # A child's DONE is read after that task's states, so these tasks' states are all in this batch.
        finished = self._take_finished()
        records = recorder.flush()
        if self.replies is not None:
            self.replies.send(records)
            self.stores += 1
        elif self.backend is not None:
            try:
                self.backend.store(records)
                self.stores += 1
                if self.after_store is not None:
                    self.after_store(records)
            except Exception as exc:
                logger.error("result backend write of %d state(s) failed, will retry: %s", len(records), exc)
                for record in records:
                    # Forget first: precedence would drop a final state recorded again over itself,
                    # and the journal would then release a task whose result was never stored.
                    recorder.forget(record.task_id)
                    recorder.record(record.task_id, record.state, record.result, record.traceback,
                                    record.timestamp)
                self._finished[:0] = finished
                return
        self._release(finished)

    def _take_finished(self) -> list[JournalRef]:
        finished, self._finished = self._finished, []
        return finished

    def _release(self, keys: list[JournalRef]) -> None:
        if not keys or self.journal is None:
            return
        if self.may_release is not None and not self.may_release():
            self._finished[:0] = keys  # released by a later flush, once allowed
            return
        self.journal.remove(keys)
