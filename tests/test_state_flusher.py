"""The state flusher: task states leave in batches, and the journal forgets a task only once its states are out."""

from __future__ import annotations

from engine import states
from engine.backends.memory import MemoryBackend
from engine.serialization import dumps
from engine.worker.state_flusher import BATCH_SIZE, STATE_FLUSH_INTERVAL, StateFlusher


class FakeJournal:
    """Records which journal keys were released."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove(self, keys):
        self.removed += keys


class FailingBackend(MemoryBackend):
    """A memory backend whose next ``failures`` writes raise, as a locked or unreachable store does."""

    def __init__(self, failures: int) -> None:
        super().__init__("memory://")
        self.failures = failures
        self.writes = 0

    def store(self, records):
        self.writes += 1
        if self.failures:
            self.failures -= 1
            raise OSError("database is locked")
        super().store(records)


class FakeReplies:
    """Collects the batches sent back to clients (rpc://)."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def send(self, records):
        self.batches.append(list(records))


def state_of(backend, task_id):
    record = backend.get(task_id)
    return None if record is None else record.state


def test_a_state_is_written_with_its_result_serialized():
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend)
    flusher.record("t1", states.SUCCESS, {"answer": 42}, None)
    assert flusher.pending

    flusher.flush(now=10.0)

    assert not flusher.pending
    record = backend.get("t1")
    assert (record.state, record.result) == (states.SUCCESS, {"answer": 42})


def test_a_childs_state_keeps_its_encoded_result_and_timestamp():
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend)
    flusher.record_encoded("t1", "PROGRESS", dumps({"done": 50}), None, 123.5)
    flusher.flush(now=10.0)
    record = backend.get("t1")
    assert (record.state, record.result, record.timestamp) == ("PROGRESS", {"done": 50}, 123.5)


def test_states_wait_for_the_flush_interval_unless_forced():
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend)
    flusher.record("t1", states.STARTED, None, None)
    flusher.flush(now=10.0)
    flusher.record("t2", states.STARTED, None, None)

    flusher.flush(now=10.0 + STATE_FLUSH_INTERVAL / 2)
    assert state_of(backend, "t2") is None  # too soon after the last batch
    flusher.flush(now=10.0 + STATE_FLUSH_INTERVAL / 2, force=True)
    assert state_of(backend, "t2") == states.STARTED

    flusher.record("t3", states.STARTED, None, None)
    flusher.flush(now=10.0 + STATE_FLUSH_INTERVAL * 2)
    assert state_of(backend, "t3") == states.STARTED


def test_a_full_batch_goes_out_at_once():
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend)
    flusher.record("t", states.SUCCESS, 0, None)
    flusher.flush(now=10.0)  # a batch just went out
    for i in range(BATCH_SIZE):
        flusher.record(f"t{i}", states.SUCCESS, i, None)
    flusher.flush(now=10.0)  # no time has passed, but the batch is full
    assert not flusher.pending
    assert state_of(backend, f"t{BATCH_SIZE - 1}") == states.SUCCESS


def test_a_late_state_does_not_replace_a_final_one():
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend)
    flusher.record("t1", states.SUCCESS, 1, None)
    flusher.record("t1", states.STARTED, None, None)
    flusher.flush(now=10.0)
    assert state_of(backend, "t1") == states.SUCCESS


def test_the_journal_forgets_a_task_only_once_its_states_are_out():
    journal = FakeJournal()
    backend = MemoryBackend("memory://")
    flusher = StateFlusher(backend, journal=journal)
    flusher.record("t0", states.SUCCESS, 0, None)
    flusher.flush(now=10.0)  # a batch just went out
    flusher.record("t1", states.SUCCESS, 1, None)
    flusher.finished("t1:0")

    flusher.flush(now=10.0 + STATE_FLUSH_INTERVAL / 2)  # states held back: so is the release
    assert journal.removed == []
    flusher.flush(now=10.0 + STATE_FLUSH_INTERVAL * 2)
    assert state_of(backend, "t1") == states.SUCCESS
    assert journal.removed == ["t1:0"]


def test_a_task_without_states_is_released_at_the_next_flush():
    # Ignore, ignored results: nothing to write, nothing to wait for.
    journal = FakeJournal()
    flusher = StateFlusher(MemoryBackend("memory://"), journal=journal)
    flusher.finished("t1:0")
    flusher.flush(now=10.0)
    assert journal.removed == ["t1:0"]


def test_a_failed_backend_write_keeps_states_and_journal_entries_for_the_next_flush(caplog):
    journal = FakeJournal()
    backend = FailingBackend(failures=1)
    flusher = StateFlusher(backend, journal=journal)
    flusher.record("t1", states.SUCCESS, 1, None)
    flusher.finished("t1:0")

    flusher.flush(now=10.0, force=True)

    assert "will retry" in caplog.text
    assert flusher.pending
    assert journal.removed == []
    flusher.finished("t2:0")  # a task that finished meanwhile is released with the others
    flusher.flush(now=11.0, force=True)
    assert backend.writes == 2
    assert state_of(backend, "t1") == states.SUCCESS
    assert journal.removed == ["t1:0", "t2:0"]


def test_rpc_states_go_to_the_reply_router_not_the_backend():
    backend = MemoryBackend("memory://")
    replies = FakeReplies()
    journal = FakeJournal()
    flusher = StateFlusher(backend, replies, journal)
    flusher.record("t1", states.SUCCESS, 1, None)
    flusher.finished("t1:0")
    flusher.flush(now=10.0)
    assert [[(r.task_id, r.state) for r in batch] for batch in replies.batches] == [[("t1", states.SUCCESS)]]
    assert state_of(backend, "t1") is None
    assert journal.removed == ["t1:0"]


def test_without_a_backend_states_are_dropped_and_tasks_still_released():
    journal = FakeJournal()
    flusher = StateFlusher(journal=journal)
    flusher.record("t1", states.SUCCESS, 1, None)
    flusher.finished("t1:0")
    flusher.flush(now=10.0)
    assert not flusher.pending
    assert journal.removed == ["t1:0"]


def test_a_chord_header_task_stays_in_the_journal_until_its_count_succeeded(tmp_path):
    # Stored but not counted (the count failed), a header task must be replayed after a
    # crash, or its chord would never complete: the journal keeps it until it is counted.
    from engine import Engine
    from engine.core import TaskMessage
    from engine.worker.chords import ChordCounter

    app = Engine("flush", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)
    backend = app.backend
    backend.chord_start("body", ["h1", "h2"], {"task": "t.sum"})
    failures = [OSError("database is locked")]
    real_count = backend.chord_parts_done

    def count(parts, firer=None):
        if failures:
            raise failures.pop()
        return real_count(parts, firer)

    backend.chord_parts_done = count
    journal = FakeJournal()
    flusher = StateFlusher(backend, journal=journal)
    counter = ChordCounter(app, backend, flusher, send=lambda message: None)
    flusher.after_store, flusher.may_release = counter.stored, counter.all_counted
    counter.watch(TaskMessage("h1", "t.add", options={"chord": "body"}))
    flusher.record("h1", states.SUCCESS, 1, None)
    flusher.finished("h1:0")

    flusher.flush(now=10.0, force=True)
    assert state_of(backend, "h1") == states.SUCCESS and journal.removed == []  # stored, not counted: kept
    flusher.flush(now=11.0, force=True)
    assert journal.removed == []
    counter.retry()  # the housekeeping pass counts it
    flusher.flush(now=12.0, force=True)
    assert journal.removed == ["h1:0"]
    app.close()
