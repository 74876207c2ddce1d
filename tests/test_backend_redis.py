"""The redis:// result backend against a real redis-server (started by the tests).

Skipped when ``redis-server`` is not installed, except under ``CI=true``,
where its absence fails the run. Every wait is bounded; the server and any
worker are stopped by pid.
"""

from __future__ import annotations

import builtins
import threading
import time
import uuid

import pytest

from engine import Engine, states
from engine.core import StateRecord
from engine.exceptions import TimeoutError as EngineTimeoutError
from engine.serialization import dumps
from tests.redis_server import redis_url_fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]  # a redis-server for the session

redis_url = pytest.fixture(scope="session", name="redis_url")(redis_url_fixture)

EXPIRES = 120


@pytest.fixture
def app(redis_url):
    """An app whose result backend is the test redis-server."""
    application = Engine("t", backend=redis_url, result_expires=EXPIRES)
    yield application
    application.close()


def new_id() -> str:
    return str(uuid.uuid4())


def test_backend_is_picked_by_scheme(app):
    from engine.backends.redis import RedisBackend

    assert isinstance(app.backend, RedisBackend)


def test_value_round_trip(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.SUCCESS, {"a": [1, 2, 3], "b": "x"})
    result = app.AsyncResult(task_id)
    assert result.state == states.SUCCESS
    assert result.get(timeout=5) == {"a": [1, 2, 3], "b": "x"}
    record = app.backend.get_encoded(task_id)
    assert isinstance(record.result, bytes) and record.timestamp > 0 and record.traceback is None


def test_exception_round_trip(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.FAILURE, ValueError("boom"), traceback="Traceback: boom")
    result = app.AsyncResult(task_id)
    assert result.state == states.FAILURE
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=5)
    assert isinstance(result.get(timeout=5, propagate=False), ValueError)
    assert app.backend.get(task_id).traceback == "Traceback: boom"


def test_unknown_id_is_pending(app):
    assert app.AsyncResult(new_id()).state == states.PENDING
    assert app.backend.get(new_id()) is None


def test_late_started_does_not_overwrite_success(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.SUCCESS, 42)
    app.backend.store_state(task_id, states.STARTED, None)
    assert app.AsyncResult(task_id).state == states.SUCCESS
    assert app.AsyncResult(task_id).get(timeout=5) == 42


def test_success_replaces_failure_but_not_the_other_way(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.FAILURE, ValueError("first"), traceback="tb")
    app.backend.store_state(task_id, states.SUCCESS, "second")
    record = app.backend.get(task_id)
    assert (record.state, record.result, record.traceback) == (states.SUCCESS, "second", None)
    app.backend.store_state(task_id, states.FAILURE, ValueError("late"))
    assert app.backend.get(task_id).state == states.SUCCESS


def test_non_final_states_replace_each_other_in_one_batch(app):
    task_id = new_id()
    now = time.time()
    app.backend.store([StateRecord(task_id, states.STARTED, dumps(None), None, now),
                       StateRecord(task_id, "PROGRESS", dumps({"done": 1}), None, now),
                       StateRecord(task_id, states.SUCCESS, dumps(7), None, now),
                       StateRecord(task_id, states.STARTED, dumps(None), None, now)])
    record = app.backend.get(task_id)
    assert (record.state, record.result) == (states.SUCCESS, 7)


def test_precedence_holds_with_concurrent_writers(app, redis_url):
    ids = [new_id() for _ in range(200)]
    now = time.time()
    # Each writer has its own app (own connections), as separate workers would; every
    # writer sends each id's states in a different order, the SUCCESS one only once.
    plans = [
        [states.STARTED, states.FAILURE],
        [states.FAILURE, states.STARTED],
        [states.SUCCESS, states.STARTED, states.FAILURE],
        [states.RETRY, states.STARTED, states.FAILURE],
    ]
    apps = [Engine("t", backend=redis_url) for _ in plans]
    barrier = threading.Barrier(len(plans))

    def write(writer_app, plan):
        barrier.wait(10)
        for chunk_start in range(0, len(ids), 20):
            for state in plan:
                writer_app.backend.store([
                    StateRecord(task_id, state, dumps(state == states.SUCCESS and "ok" or ValueError(state)),
                                "tb" if state == states.FAILURE else None, now)
                    for task_id in ids[chunk_start:chunk_start + 20]])

    threads = [threading.Thread(target=write, args=pair) for pair in zip(apps, plans)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        records = [app.backend.get(task_id) for task_id in ids]
        assert {(r.state, r.result, r.traceback) for r in records} == {(states.SUCCESS, "ok", None)}
    finally:
        for writer_app in apps:
            writer_app.close()


def test_forget(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.SUCCESS, 1)
    app.AsyncResult(task_id).forget()
    assert app.AsyncResult(task_id).state == states.PENDING


def test_expiry_is_set(app):
    import redis

    task_id = new_id()
    app.backend.store_state(task_id, states.SUCCESS, 1)
    client = redis.Redis.from_url(app.conf.result_backend)
    try:
        ttl = client.ttl(f"engine-result:{task_id}")
    finally:
        client.close()
    assert 0 < ttl <= EXPIRES


def test_get_wakes_up_when_another_thread_stores_the_result(app):
    task_id = new_id()
    timer = threading.Timer(0.2, app.backend.store_state, (task_id, states.SUCCESS, "late"))
    started = time.monotonic()
    timer.start()
    try:
        assert app.AsyncResult(task_id).get(timeout=10) == "late"
    finally:
        timer.cancel()
        timer.join(5)
    assert time.monotonic() - started < 1.5


def test_get_times_out_when_nothing_comes(app):
    task_id = new_id()
    app.backend.store_state(task_id, states.STARTED)  # a non-final state must not end the wait
    started = time.monotonic()
    with pytest.raises(EngineTimeoutError) as info:
        app.AsyncResult(task_id).get(timeout=0.5)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, builtins.TimeoutError)
    assert 0.4 <= elapsed < 3


def _store_later(app, task_id, value, delay=0.05):
    timer = threading.Timer(delay, app.backend.store_state, (task_id, states.SUCCESS, value))
    timer.start()
    return timer


def test_waits_share_one_pubsub_connection_and_survive_a_timed_out_one(app):
    connections = lambda: app.backend.client.info("stats")["total_connections_received"]  # noqa: E731
    abandoned = new_id()
    with pytest.raises(EngineTimeoutError):
        app.AsyncResult(abandoned).get(timeout=0.2)  # leaves an unsubscribe confirmation behind
    before = connections()
    for i in range(15):
        task_id = new_id()
        timer = _store_later(app, task_id, i)
        try:
            assert app.AsyncResult(task_id).get(timeout=10) == i
        finally:
            timer.cancel()
            timer.join(5)
    # The pub/sub connection is reused: no new connection per wait (at most one for the timers' writes).
    assert connections() - before <= 2
    timer = _store_later(app, abandoned, "at last")
    try:
        assert app.AsyncResult(abandoned).get(timeout=10) == "at last"
    finally:
        timer.join(5)


def test_batch_of_1000_records_in_one_call(app):
    ids = [new_id() for _ in range(1000)]
    now = time.time()
    app.backend.store([StateRecord(task_id, states.SUCCESS, dumps(i), None, now) for i, task_id in enumerate(ids)])
    assert [app.AsyncResult(task_id).get(timeout=5) for task_id in ids] == list(range(1000))


def test_connection_is_recreated_in_a_forked_child(app):
    import os

    app.backend.store_state(new_id(), states.SUCCESS, 0)  # the parent has a connection now
    parent_client = app.backend.client
    task_id = new_id()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if app.backend.client is not parent_client:
                app.backend.store_state(task_id, states.SUCCESS, "from child")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert app.backend.client is parent_client
    assert app.AsyncResult(task_id).get(timeout=5) == "from child"


def test_end_to_end_with_a_real_worker(redis_url):
    from tests import workerapp
    from tests.worker_helpers import WorkerProcess, free_endpoint

    endpoint = free_endpoint()
    app = workerapp.app
    saved = {name: app.conf[name] for name in ("transport", "result_backend", "transport_bind",
                                               "producer_flush_timeout")}
    app.close()
    app.conf.update(transport=endpoint, result_backend=redis_url, transport_bind=False, producer_flush_timeout=30)
    worker = WorkerProcess("--concurrency", "1",
                           env={"ENGINE_TEST_ENDPOINT": endpoint, "ENGINE_TEST_BACKEND": redis_url})
    try:
        worker.wait_ready()
        result = workerapp.add.delay(2, 3)
        assert result.get(timeout=30) == 5
        assert result.state == states.SUCCESS
        assert worker.stop() == 0, worker.output  # SIGTERM: warm shutdown
    finally:
        app.close()
        app.conf.update(saved)
        if worker.proc.poll() is None:
            worker.kill()


def test_group_results_are_read_in_pipelined_bulk(app):
    from engine.canvas import GroupResult

    ids = [new_id() for _ in range(2500)]  # more than one round trip's worth
    app.backend.store([StateRecord(task_id, states.SUCCESS, dumps(i), None, 1.0) for i, task_id in enumerate(ids)])
    failed, running = new_id(), new_id()
    app.backend.store_state(failed, states.FAILURE, KeyError("gone"), traceback="Traceback ...")
    app.backend.store_state(running, states.STARTED, None)

    found = app.backend.get_many_encoded([ids[0], failed, running, new_id()])
    assert [record.state for record in found.values()] == [states.SUCCESS, states.FAILURE, states.STARTED]
    assert GroupResult([app.AsyncResult(i) for i in ids]).get(timeout=10) == list(range(2500))
    with pytest.raises(KeyError):
        GroupResult([app.AsyncResult(ids[0]), app.AsyncResult(failed)]).get(timeout=5)
    assert GroupResult([app.AsyncResult(ids[0]), app.AsyncResult(running)]).completed_count() == 1


def test_the_redis_store_counts_each_chord_header_task_once_and_completes_the_chord_once(app):
    backend = app.backend
    chord_id = new_id()
    backend.chord_start(chord_id, ["a", "b"], {"task": "t.sum"})
    assert backend.chord_parts_done([(chord_id, "a"), (chord_id, "a")]) == []  # a task that ran twice counts once
    assert backend.chord_parts_done([(chord_id, "b")]) == [(chord_id, ["a", "b"], {"task": "t.sum"})]
    assert backend.chord_parts_done([(chord_id, "b"), (chord_id, "c")]) == []  # never twice
    assert backend.client.pttl(f"engine-chord:{chord_id}") > 0  # expires with the results

    # Thousands of parts of two chords in one call (more than one script call's worth each).
    big, other = new_id(), new_id()
    header = [f"h{i}" for i in range(2500)]
    backend.chord_start(big, header, {"task": "t.sum"})
    backend.chord_start(other, ["x", "y"], {"task": "t.sum"})
    parts = [(big, task_id) for task_id in header[:-1]] + [(other, "x"), (big, header[0])]
    assert backend.chord_parts_done(parts) == []
    assert backend.chord_parts_done([(other, "y"), (big, header[-1])]) == \
        [(other, ["x", "y"], {"task": "t.sum"}), (big, header, {"task": "t.sum"})]


def test_a_chord_through_a_worker_with_redis_results(redis_url, tmp_path):
    from engine import chord
    from tests import workerapp
    from tests.worker_helpers import WorkerProcess, free_endpoint

    endpoint = free_endpoint()
    workerapp.app.close()
    workerapp.app.conf.update(transport=endpoint, result_backend=redis_url, producer_flush_timeout=10)
    worker = WorkerProcess("--concurrency", "2", env={"ENGINE_TEST_ENDPOINT": endpoint,
                                                     "ENGINE_TEST_BACKEND": redis_url}).wait_ready()
    try:
        marks = tmp_path / "runs"
        result = chord(workerapp.add.s(i, i) for i in range(100))(workerapp.tsum_marked.s(str(marks)))
        assert result.get(timeout=60) == sum(2 * i for i in range(100))
        assert len(marks.read_text().splitlines()) == 1
    finally:
        workerapp.app.close()
        worker.kill()


def test_a_wait_on_many_is_woken_by_the_ready_channel_not_by_polling(app, monkeypatch):
    from engine.canvas import GroupResult

    writer = Engine("writer", backend=app.conf.result_backend, set_as_current=False)
    done, late = new_id(), new_id()
    writer.backend.store([StateRecord(done, states.SUCCESS, dumps(1), None, time.time())])
    reads = []
    real = app.backend.get_many_encoded
    monkeypatch.setattr(app.backend, "get_many_encoded", lambda wanted: reads.append(list(wanted)) or real(wanted))
    timer = threading.Timer(1.0, writer.backend.store, ([StateRecord(late, states.SUCCESS, dumps(2), None,
                                                                     time.time())],))
    timer.start()
    started = time.monotonic()
    try:
        assert GroupResult([app.AsyncResult(done), app.AsyncResult(late)]).get(timeout=20, interval=30) == [1, 2]
    finally:
        timer.cancel()
        timer.join(10)  # the result is seen before the store's reply is read: the connection is still in use
        writer.close()
    assert time.monotonic() - started < 10
    assert len(reads) <= 4 and reads[-1] == [late]  # woken by the store's message; only what was missing read


def test_the_redis_store_remembers_which_worker_fires_a_chord_until_its_body_is_queued(app):
    from tests.test_chord import _store_fire_recover

    app.backend.client.delete("engine-chords-firing:w1 /j.db", "engine-chords-firing:w2 /j.db")
    _store_fire_recover(app.backend)
    app.backend.chord_bodies_queued(["fc2"], "w1 /j.db")


def test_a_chord_abandoned_by_a_lost_worker_goes_to_one_other_on_redis(app):
    from engine.backends.redis import ALIVE_PREFIX
    from tests.test_chord import _take_over_abandoned

    client = app.backend.client
    client.delete(*(f"engine-chords-firing:{name}" for name in ("w1 /j.db", "w2 /j.db", "w3 /j.db", "old /j.db",
                                                                 "host:old /j.db")))
    _take_over_abandoned(app.backend, lambda firer: client.delete(ALIVE_PREFIX + firer))


def test_forgetting_a_group_deletes_every_member_in_bulk(app):
    from engine.canvas import GroupResult

    ids = [new_id() for _ in range(1500)]
    app.backend.store([StateRecord(i, states.SUCCESS, dumps(1), None, time.time()) for i in ids])
    GroupResult([app.AsyncResult(i) for i in ids]).forget()
    assert app.backend.get_many_encoded(ids) == {}
