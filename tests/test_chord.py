"""Chords (issue 14, part): the body once, with the header's results in order, triggered by the store."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import Engine, chord, group, states
from engine.core import StateRecord
from engine.exceptions import ChordError
from engine.serialization import dumps
from engine.utils.hostname import HOSTNAME


@pytest.fixture
def eager():
    app = Engine("chords", backend="memory://", task_always_eager=True, set_as_current=False)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def tsum(values):
        return sum(values)

    @app.task
    def fails(message):
        raise ValueError(message)

    yield app
    app.close()


def test_an_eager_chord_gives_the_body_the_header_results_in_order(eager):
    add, tsum = eager.tasks["tests.test_chord.add"], eager.tasks["tests.test_chord.tsum"]
    assert chord(add.s(i, i) for i in range(10))(tsum.s()).get() == 90
    assert (group(add.s(i, 1) for i in range(3)) | tsum.s()).apply_async().get() == 6


def test_an_eager_chord_whose_header_fails_raises_chord_error_naming_the_task(eager):
    add, tsum, fails = (eager.tasks[f"tests.test_chord.{n}"] for n in ("add", "tsum", "fails"))
    result = chord([add.s(1, 1), fails.s("broken")], tsum.s()).apply_async()
    with pytest.raises(ChordError, match="Dependency .* raised ValueError"):
        result.get()


def test_a_chord_needs_a_backend_the_workers_share():
    app = Engine("chords", backend="memory://", set_as_current=False)

    @app.task
    def noop(*args):
        return None

    app.send_message = lambda message: None
    with pytest.raises(NotImplementedError, match="sqlite:// or redis://"):
        chord([noop.s()], noop.s()).apply_async()


def test_the_sqlite_store_counts_each_header_task_once_and_completes_the_chord_once(tmp_path):
    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)
    backend = app.backend
    backend.chord_start("c1", ["a", "b", "c"], {"task": "t.sum"})
    assert backend.chord_parts_done([("c1", "a"), ("c1", "a")]) == []  # a task that ran twice counts once
    assert backend.chord_parts_done([("c1", "b")]) == []
    assert backend.chord_parts_done([("c1", "c")]) == [("c1", ["a", "b", "c"], {"task": "t.sum"})]
    assert backend.chord_parts_done([("c1", "c"), ("c1", "d")]) == []  # never twice
    header = [f"h{i}" for i in range(2500)]
    backend.chord_start("big", header, {"task": "t.sum"})
    backend.chord_start("c2", ["x", "y"], {"task": "t.sum"})
    parts = [("big", task_id) for task_id in header[:-1]] + [("c2", "x"), ("big", header[0])]
    assert backend.chord_parts_done(parts) == []  # many parts of two chords, one counted twice
    assert backend.chord_parts_done([("c2", "y"), ("big", header[-1])]) == \
        [("c2", ["x", "y"], {"task": "t.sum"}), ("big", header, {"task": "t.sum"})]
    app.close()


# --- through real workers -------------------------------------------------------------


@pytest.mark.slow
def test_a_chord_through_a_worker_runs_its_body_once_with_the_results_in_order(worker_setup, tmp_path):
    from tests import workerapp

    worker_setup("--concurrency", "2")
    marks = tmp_path / "body-runs"
    started = time.monotonic()
    result = chord(workerapp.add.s(i, i) for i in range(200))(workerapp.tsum_marked.s(str(marks)))
    assert result.get(timeout=60) == sum(2 * i for i in range(200))
    assert time.monotonic() - started < 60
    assert len(marks.read_text().splitlines()) == 1

    failing = chord([workerapp.add.s(1, 1), workerapp.fails.s("header broke")],
                    workerapp.tsum_marked.s(str(marks)))
    with pytest.raises(ChordError, match="header broke"):
        failing.apply_async().get(timeout=60)
    assert len(marks.read_text().splitlines()) == 1  # the body did not run
    # The worker said it lives, under its host and journal (pods of one Deployment share the path).
    firers = [row[0] for row in workerapp.app.backend._connection().execute("SELECT firer FROM engine_chord_firers")]
    assert len(firers) == 1 and firers[0].startswith(f"{HOSTNAME}:/")


@pytest.mark.slow
def test_a_chord_survives_its_worker_killed_mid_header_and_runs_its_body_once(worker_setup, tmp_path):
    from tests import workerapp

    journal = str(tmp_path / "journal.db")
    worker = worker_setup("--concurrency", "2", "--journal", journal)
    marks = tmp_path / "body-runs"
    result = chord(workerapp.sleepy.s(0.05) for _ in range(40))(workerapp.tsum_marked.s(str(marks)))
    # Killed with part of the header done: its journal keeps the rest.
    deadline = time.monotonic() + 30
    while workerapp.app.producer.waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.proc.wait(10)
    worker_setup("--concurrency", "2", "--journal", journal)
    assert result.get(timeout=60) == pytest.approx(40 * 0.05)
    assert len(marks.read_text().splitlines()) == 1
    assert workerapp.app.AsyncResult(result.id).state == states.SUCCESS


@pytest.mark.slow
def test_header_tasks_that_ignore_their_results_still_complete_the_chord(worker_setup, tmp_path):
    from tests import workerapp

    worker_setup("--concurrency", "2")
    marks = tmp_path / "body-runs"
    result = chord(workerapp.noop.si() for _ in range(20))(workerapp.tsum_marked.si([], str(marks)))
    assert result.get(timeout=60) == 0


# --- chains holding groups and chords (Celery's canvas) --------------------------------


def test_an_eager_chain_passes_results_through_groups_and_chords(eager):
    from engine import chain

    add, tsum = eager.tasks["tests.test_chord.add"], eager.tasks["tests.test_chord.tsum"]
    # group followed by a task: Celery's upgrade to a chord.
    result = chain(add.s(1, 1), group(add.s(10), add.s(20)), tsum.s(), add.s(100)).apply_async()
    assert result.get() == 134  # 2 -> [12, 22] -> 34 -> 134
    result = (add.s(1, 1) | chord([add.s(1), add.s(2)], tsum.s()) | add.s(5)).apply_async()
    assert result.get() == 12  # 2 -> [3, 4] -> 7 -> 12
    ending = (add.s(1, 1) | group(add.s(1), add.s(2))).apply_async()
    assert ending.get() == [3, 4]


def test_a_chain_turns_a_group_followed_by_a_task_into_a_chord_and_carries_it_as_celery_dicts(eager):
    from engine import chain
    from engine.canvas import maybe_signature, step_dict

    add, tsum = eager.tasks["tests.test_chord.add"], eager.tasks["tests.test_chord.tsum"]
    steps = chain(add.s(1, 1), group(add.s(10), add.s(20)), tsum.s()).tasks
    assert len(steps) == 2 and isinstance(steps[1], chord)
    carried = step_dict(steps[1])
    assert carried["subtask_type"] == "chord" and [t["task"] for t in carried["kwargs"]["header"]] == [add.name] * 2
    rebuilt = maybe_signature(carried, app=eager)
    assert isinstance(rebuilt, chord) and rebuilt.body.task == tsum.name
    assert isinstance(maybe_signature(step_dict(group(add.s(1), add.s(2))), app=eager), group)
    with pytest.raises(ValueError, match="followed by a task signature only"):
        chain(add.s(1, 1), group(add.s(1)), group(add.s(2)))


@pytest.mark.slow
def test_chains_with_groups_and_chords_through_a_worker(worker_setup):
    from engine import chain
    from tests import workerapp

    worker_setup("--concurrency", "2")
    add, tsum = workerapp.add, workerapp.tsum
    result = chain(add.s(1, 1), group(add.s(10), add.s(20)), tsum.s(), add.s(100)).apply_async()
    assert result.get(timeout=60) == 134
    assert result.parent.get(timeout=10) == 34  # the chord's body, the step before
    result = (add.s(1, 1) | chord([add.s(i) for i in range(5)], tsum.s()) | add.s(5)).apply_async()
    assert result.get(timeout=60) == 2 * 5 + sum(range(5)) + 5
    ending = (add.s(1, 1) | group(add.s(1), add.s(2))).apply_async()
    assert ending.get(timeout=60) == [3, 4]
    nested = chord([chain(add.s(1, 1), add.s(1)), add.s(10, 10)], tsum.s()).apply_async()
    assert nested.get(timeout=60) == 3 + 20  # a chain as a header member
    inner = (add.s(1, 1) | group(chain(add.s(1), add.s(1)), add.s(5))).apply_async()
    assert inner.get(timeout=60) == [4, 7]  # a chain as a group member


def test_the_worker_that_stored_the_header_results_sends_the_body_without_reading_them_back(tmp_path, monkeypatch):
    from engine.core import StateRecord, TaskMessage
    from engine.serialization import dumps
    from engine.worker import chords as chords_module
    from engine.worker.chords import ChordCounter

    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)

    @app.task
    def tsum(values):
        return sum(values)

    backend = app.backend
    sent: list = []
    reads: list = []
    real_read = backend.get_many_encoded
    backend.get_many_encoded = lambda ids: reads.append(list(ids)) or real_read(ids)
    counter = ChordCounter(app, backend, states_out=None, send=sent.append)  # type: ignore[arg-type]
    ids = [f"h{i}" for i in range(6)]
    backend.chord_start("body-1", ids, dict(tsum.s()))
    for task_id in ids:
        counter.watch(TaskMessage(task_id, "t.add", options={"chord": "body-1"}))

    def records(part):
        return [StateRecord(task_id, states.SUCCESS, dumps(int(task_id[1:])), None, time.time()) for task_id in part]

    # Another worker ran h0 and stored it; this worker stores and counts the rest.
    backend.store(records(["h0"]))
    backend.chord_parts_done([("body-1", "h0")])
    counter._chord_of.pop("h0")
    backend.store(records(ids[1:3]))
    counter.stored(records(ids[1:3]))
    monkeypatch.setattr(chords_module, "CACHE_BYTES", 0)  # past the bound: h3.. are not kept
    backend.store(records(ids[3:]))
    counter.stored(records(ids[3:]))

    assert len(sent) == 1 and sent[0].args == ([0, 1, 2, 3, 4, 5],)
    assert reads == [["h0", "h3", "h4", "h5"]]  # only what this worker did not keep
    assert counter._kept == {} and counter._kept_bytes == 0

    monkeypatch.setattr(chords_module, "CACHE_BYTES", 1 << 20)
    counter._keep("stale", records(["h9"])[0], now=0.0)
    assert counter._kept_bytes > 0
    counter.prune(now=chords_module.CACHE_SECONDS + 1)  # never completed here: dropped in the end
    assert counter._kept == {} and counter._kept_bytes == 0
    app.close()


class FlusherStandIn:
    """What a ChordCounter reads of the state flusher: no journal, a count of stores, states pending or not."""

    journal = None

    def __init__(self, pending: bool = False) -> None:
        self.stores = 0
        self.pending = pending


def _summing_app(tmp_path):
    """An app on a new SQLite store, and its ``tsum`` task: the body of the chord recovery tests' chords."""
    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)

    @app.task
    def tsum(values):
        return sum(values)

    return app, tsum


def _chord_with_results(backend, chord_id: str, body_task, results: dict[str, int]) -> None:
    """A chord whose header tasks (id -> result) are stored as succeeded and not counted yet."""
    backend.chord_start(chord_id, list(results), dict(body_task.s().set(task_id=chord_id)))
    backend.store([StateRecord(task_id, states.SUCCESS, dumps(value), None, time.time())
                   for task_id, value in results.items()])


def _store_fire_recover(backend):
    """The firing protocol on any chord store: noted as being fired until reported queued."""
    backend.chord_start("fc1", ["a"], {"task": "t.sum"})
    backend.chord_start("fc2", ["b"], {"task": "t.sum"})
    assert backend.chord_parts_done([("fc1", "a"), ("fc2", "b")], "w1 /j.db") == [
        ("fc1", ["a"], {"task": "t.sum"}), ("fc2", ["b"], {"task": "t.sum"})]
    assert sorted(c for c, _, _ in backend.chords_firing("w1 /j.db")) == ["fc1", "fc2"]
    assert backend.chords_firing("w2 /j.db") == []  # another worker's are not ours to send
    backend.chord_bodies_queued(["fc1"], "w1 /j.db")
    assert backend.chords_firing("w1 /j.db") == [("fc2", ["b"], {"task": "t.sum"})]


def _take_over_abandoned(backend, silence):
    """On any chord store: a chord whose firing worker went silent goes to one other worker, once.

    ``silence(firer)`` makes the store see ``firer`` as not alive any more.
    """
    def ours(rows):  # a shared store may hold other tests' chords
        return [row for row in rows if row[0] in ("ab1", "ab2", "ab3")]

    for chord_id, part in (("ab1", "a"), ("ab2", "b"), ("ab3", "c")):
        backend.chord_start(chord_id, [part], {"task": "t.sum"})
    backend.firer_alive("w1 /j.db")
    assert len(backend.chord_parts_done([("ab1", "a")], "w1 /j.db")) == 1
    assert len(backend.chord_parts_done([("ab2", "b")], None)) == 1  # a worker without a journal: not tracked
    # A worker of an earlier version never says it is alive: what it fires is never taken from it.
    assert len(backend.chord_parts_done([("ab3", "c")], "old /j.db")) == 1
    backend.firer_alive("w2 /j.db")
    assert ours(backend.chords_abandoned("w2 /j.db")) == []  # w1 lives
    silence("w1 /j.db")
    assert ours(backend.chords_abandoned("w2 /j.db")) == [("ab1", ["a"], {"task": "t.sum"})]
    assert ours(backend.chords_abandoned("w3 /j.db")) == []  # one taker only
    assert backend.chords_firing("w1 /j.db") == []  # w1, back after all, does not send it again
    assert [chord_id for chord_id, _, _ in backend.chords_firing("w2 /j.db")] == ["ab1"]
    backend.chord_bodies_queued(["ab1"], "w2 /j.db")
    assert backend.chords_firing("w2 /j.db") == [] and ours(backend.chords_abandoned("w3 /j.db")) == []
    assert [chord_id for chord_id, _, _ in backend.chords_firing("old /j.db")] == ["ab3"]
    # ... until that worker, upgraded, starts under its new identity and takes its own chords over.
    assert ours(backend.chords_take_over("old /j.db", "host:old /j.db")) == [("ab3", ["c"], {"task": "t.sum"})]
    assert backend.chords_firing("old /j.db") == []
    backend.chord_bodies_queued(["ab3"], "host:old /j.db")


def test_a_worker_says_it_lives_well_within_the_time_after_which_its_chords_are_taken_over():
    from engine.backends.base import FIRER_TTL
    from engine.worker.supervisor import CHORD_ADOPT_EVERY

    assert CHORD_ADOPT_EVERY * 3 <= FIRER_TTL


def test_a_worker_does_not_retry_a_body_whose_chord_was_taken_over_meanwhile(tmp_path):
    from engine.worker.chords import ChordCounter

    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)
    backend = app.backend
    backend.chord_start("slow", ["s1"], {"task": "t.sum"})
    backend.firer_alive("stalled /j")
    backend.chord_parts_done([("slow", "s1")], "stalled /j")
    sent = []

    counter = ChordCounter(app, backend, states_out=FlusherStandIn(), send=sent.append, firer="stalled /j")  # type: ignore[arg-type]
    counter._unstarted.append(("slow", ["s1"], {"task": "t.sum"}))  # its first start failed
    backend._connection().execute("UPDATE engine_chord_firers SET seen = 0 WHERE firer = 'stalled /j'")
    backend.firer_alive("other /j")
    assert [c for c, _, _ in backend.chords_abandoned("other /j")] == ["slow"]
    counter.retry()
    assert sent == [] and counter._unstarted == []  # the other worker sends it, not this one as well
    app.close()


def test_a_results_file_of_an_earlier_version_gets_what_chords_need_when_opened(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE engine_results (task_id TEXT PRIMARY KEY, state TEXT NOT NULL, ready INTEGER NOT NULL,
            strength INTEGER NOT NULL, result BLOB, traceback TEXT, date_done REAL NOT NULL);
        CREATE TABLE engine_chords (chord_id TEXT PRIMARY KEY, size INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0, fired INTEGER NOT NULL DEFAULT 0, header BLOB NOT NULL,
            body BLOB NOT NULL, created REAL NOT NULL);
        CREATE TABLE engine_chord_parts (chord_id TEXT NOT NULL, task_id TEXT NOT NULL,
            PRIMARY KEY (chord_id, task_id));
    """)
    old.close()
    app = Engine("chords", backend=f"sqlite:///{path}", set_as_current=False)
    backend = app.backend
    backend.chord_start("c", ["p"], {"task": "t.sum"})
    backend.firer_alive("w /j")
    assert len(backend.chord_parts_done([("c", "p")], "w /j")) == 1
    assert [c for c, _, _ in backend.chords_firing("w /j")] == ["c"]
    assert backend.chords_abandoned("x /j") == []
    app.close()


def test_the_sqlite_store_hands_a_chord_abandoned_by_a_lost_worker_to_one_other(tmp_path):
    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)
    backend = app.backend

    def silence(firer):
        backend._connection().execute("UPDATE engine_chord_firers SET seen = 0 WHERE firer = ?", (firer,))

    _take_over_abandoned(backend, silence)
    app.close()


def test_a_worker_sends_the_body_of_a_chord_whose_firing_worker_is_gone(tmp_path):
    from engine.worker.chords import ChordCounter

    app, tsum = _summing_app(tmp_path)
    backend = app.backend
    _chord_with_results(backend, "orphan", tsum, {"o1": 2, "o2": 3})
    backend.firer_alive("lost /j")
    assert len(backend.chord_parts_done([("orphan", "o1"), ("orphan", "o2")], "lost /j")) == 1

    sent = []
    counter = ChordCounter(app, backend, states_out=FlusherStandIn(), send=sent.append, firer="other /j")  # type: ignore[arg-type]
    counter.adopt()
    assert sent == []  # the firer still counts as alive
    backend._connection().execute("UPDATE engine_chord_firers SET seen = 0 WHERE firer = 'lost /j'")
    counter.adopt()
    assert [(m.id, m.args) for m in sent] == [("orphan", ([2, 3],))]
    counter.adopt()
    assert len(sent) == 1  # once
    counter.confirm()
    assert backend.chords_firing("other /j") == []
    app.close()


def test_the_sqlite_store_remembers_which_worker_fires_a_chord_until_its_body_is_queued(tmp_path):
    app = Engine("chords", backend=f"sqlite:///{tmp_path / 'r.db'}", set_as_current=False)
    _store_fire_recover(app.backend)
    app.close()


def test_a_restarted_worker_sends_again_the_bodies_it_fired_but_never_queued(tmp_path):
    from engine.worker.chords import ChordCounter

    app, tsum = _summing_app(tmp_path)
    backend = app.backend
    _chord_with_results(backend, "lost", tsum, {"l1": 5})
    _chord_with_results(backend, "replayed", tsum, {"r1": 5})
    # The first run counted both and crashed before their bodies were in its journal.
    assert len(backend.chord_parts_done([("lost", "l1"), ("replayed", "r1")], "w /j")) == 2

    sent = []
    states_out = FlusherStandIn(pending=True)  # states not yet stored
    counter = ChordCounter(app, backend, states_out=states_out, send=sent.append, firer="w /j")  # type: ignore[arg-type]
    counter.recover(replayed_ids={"replayed"})  # the journal had the second body already

    assert [(m.id, m.args) for m in sent] == [("lost", ([5],))]
    counter.confirm()
    assert len(backend.chords_firing("w /j")) == 2  # nothing stored since: still to recover
    counter.confirm(producer_idle=False)
    states_out.stores += 1  # a batch of states was written since
    counter.confirm(producer_idle=False)
    assert len(backend.chords_firing("w /j")) == 2  # a forwarded message is not acknowledged yet
    counter.confirm()
    assert backend.chords_firing("w /j") == []
    app.close()


@pytest.mark.slow
def test_a_failing_chain_step_fails_the_groups_and_chords_after_it(worker_setup):
    from engine import chain
    from tests import workerapp

    worker_setup("--concurrency", "2")
    add, tsum, fails = workerapp.add, workerapp.tsum, workerapp.fails
    ending = (fails.s("early") | group(add.s(1), add.s(2))).apply_async()
    with pytest.raises(ValueError, match="early"):
        ending.get(timeout=30)  # not a wait for ever
    through = chain(fails.s("early"), group(add.s(1), add.s(2)), tsum.s(), add.s(1)).apply_async()
    with pytest.raises(ValueError, match="early"):
        through.get(timeout=30)
    with pytest.raises(ValueError, match="early"):
        through.parent.get(timeout=30)  # the chord's body
