"""Rate limits (issue 17, part): Celery's syntax, tasks over the limit wait in the timer heap.

Per worker by default; shared by the workers of a cluster through Redis with
``rate_limit_url``. The tests that need a redis-server start their own on
loopback (skipped without one, failed under ``CI=true``) and are slow.
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from engine import Engine
from engine.exceptions import ImproperlyConfigured
from engine.worker.rate_limits import KEY_PREFIX, RateLimiter, RedisRateLimiter, parse_rate
from tests.redis_server import redis_url_fixture

redis_url = pytest.fixture(scope="session", name="redis_url")(redis_url_fixture)


def test_rates_take_celerys_syntax():
    assert parse_rate("100/s") == 100 and parse_rate("60/m") == 1 and parse_rate("36/h") == 0.01
    assert parse_rate(5) == 5 and parse_rate("2.5") == 2.5 and parse_rate(None) is None and parse_rate("0/s") is None
    for bad in ("fast", "10/d", "-1/s", -1):
        with pytest.raises(ValueError):
            parse_rate(bad)
    app = Engine("limits", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="rate_limit"):
        app.task(rate_limit="lots")(lambda: None)


def test_slots_are_spaced_evenly_per_name_and_never_in_the_past():
    limiter = RateLimiter()
    assert [limiter.reserve("a", 10, now=100.0) for _ in range(3)] == pytest.approx([100.0, 100.1, 100.2])
    assert limiter.reserve("b", 10, now=100.0) == 100.0  # another name has its own slots
    assert limiter.reserve("a", 10, now=200.0) == 200.0  # idle since: no debt carried over


@pytest.mark.slow
def test_a_burst_over_the_limit_is_spread_and_other_tasks_are_not_held(worker_setup, tmp_path):
    from tests import workerapp

    worker_setup("--concurrency", "2")
    runs = tmp_path / "runs"
    started = time.time()
    limited = [workerapp.limited.delay(str(runs), f"l{i}") for i in range(20)]
    quick = workerapp.add.delay(1, 1)
    assert quick.get(timeout=30) == 2
    assert time.time() - started < 1.5  # not behind the rate-limited burst
    assert [r.get(timeout=60) for r in limited] == [f"l{i}" for i in range(20)]
    starts = [float(line.split()[1]) for line in runs.read_text().splitlines()]
    assert max(starts) - min(starts) >= 1.7  # 20 at 10/s: about 1.9 s, not all at once


def test_an_eta_task_does_not_hold_back_its_kind_and_rate_held_tasks_count_against_credit():
    from engine.core import encode_message
    from engine.worker.supervisor import Supervisor
    from tests.test_supervisor_inprocess import FakePool

    app = Engine("limits", backend="memory://", set_as_current=False)

    @app.task(rate_limit="10/s")
    def limited():
        return None

    sup = Supervisor(app, concurrency=1, use_journal=False, hostname="w@test")
    sup.pool = sup.limits.pool = FakePool()
    later = limited.build_message(countdown=600)  # e.g. a retry with a countdown
    sup.accept(later, encode_message(later))
    now = [limited.build_message() for _ in range(3)]
    for message in now:
        sup.accept(message, encode_message(message))
    assert [e.message.id for e in sup.scheduler.waiting] == [now[0].id]  # not after the ETA's time
    assert len(sup.timers) == 3 and sup.rate_held == 2  # two wait for their slots, 0.1 s apart
    time.sleep(0.25)
    sup._fire_timers()
    assert [e.message.id for e in sup.scheduler.waiting] == [m.id for m in now] and sup.rate_held == 0
    sup.take_from_timers(lambda entry: True)
    assert len(sup.timers) == 0
    app.close()


def record_script_calls(limiter: RedisRateLimiter, calls: list) -> None:
    """Wrap ``limiter``'s reservation script: each call appends (interval_us, count, delay_us, redis_now_us)."""
    script = limiter._script

    def counted(keys, args):
        reply = script(keys=keys, args=args)
        calls.append((args[0], args[1], int(reply[0]), int(reply[1])))
        return reply

    limiter._script = counted


def redis_slots(calls: list) -> list[int]:
    """Every slot the recorded calls reserved, in microseconds of Redis's clock."""
    return [now + delay + j * interval for interval, count, delay, now in calls for j in range(count)]


@pytest.mark.slow
def test_two_workers_share_one_schedule_in_redis_and_lease_slots(redis_url):
    workers = [RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)]  # two supervisors' limiters
    calls: list = []
    for limiter in workers:
        record_script_calls(limiter, calls)
    try:
        # 1000/s: a lease is 50 slots. 400 reservations, alternating between the two in runs of 7.
        name, given = f"busy-{uuid.uuid4()}", {0: [], 1: []}
        for i in range(400):
            which = (i // 7) % 2
            now = time.time()
            slot = workers[which].reserve(name, 1000, now)
            assert slot >= now  # never in the past
            given[which].append(slot)
        assert len(calls) <= 12, len(calls)  # about 400 / 50 = 8, not 400 round trips
        slots = sorted(redis_slots(calls))
        assert len(slots) >= 400 and all(b - a >= 1000 for a, b in zip(slots, slots[1:]))  # 1 ms apart
        for own in given.values():  # each worker's own slots: in order, 1/rate apart
            assert all(b - a >= 0.001 - 1e-6 for a, b in zip(own, own[1:]))  # float rounding
        assert workers[0]._client.pttl(KEY_PREFIX + name) > 0  # the idle key goes away by itself

        # 20/s: a lease is one slot; alternating workers still get slots 50 ms apart on Redis's clock.
        calls.clear()
        name = f"slow-{uuid.uuid4()}"
        for i in range(10):
            now = time.time()
            assert workers[i % 2].reserve(name, 20, now) >= now
        assert len(calls) == 10
        slots = sorted(redis_slots(calls))
        assert [b - a for a, b in zip(slots, slots[1:])] == [50_000] * 9
    finally:
        for limiter in workers:
            limiter.close()


def test_without_redis_slots_are_per_worker_with_one_warning(caplog):
    from tests.worker_helpers import free_port

    limiter = RedisRateLimiter(f"redis://:secret@127.0.0.1:{free_port()}/0")  # nothing listens there
    calls: list = []
    record_script_calls(limiter, calls)
    try:
        with caplog.at_level(logging.DEBUG, logger="engine.worker.rate_limits"):
            assert [limiter.reserve("a", 10, now=100.0) for _ in range(3)] == pytest.approx([100.0, 100.1, 100.2])
            assert len(calls) == 0  # every attempt failed before a reply
            limiter._retry_at = time.monotonic() - 1  # as if RETRY_AFTER had passed: Redis is tried again
            assert limiter.reserve("a", 10, now=100.0) == pytest.approx(100.3)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "per worker" in warnings[0], warnings  # one per outage, not per task
        assert "secret" not in caplog.text
        assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 1  # the second attempt
    finally:
        limiter.close()


@pytest.mark.slow
def test_the_shared_schedule_comes_back_after_an_outage(redis_url, caplog):
    import redis

    limiter = RedisRateLimiter(redis_url)
    script = limiter._script
    failures = [redis.ConnectionError("Redis is restarting")]

    def flaky(keys, args):
        if failures:
            raise failures.pop()
        return script(keys=keys, args=args)

    limiter._script = flaky
    name = f"outage-{uuid.uuid4()}"
    try:
        with caplog.at_level(logging.INFO, logger="engine.worker.rate_limits"):
            now = time.time()
            assert limiter.reserve(name, 10, now) == now  # per worker: due at once
            assert limiter._client.get(KEY_PREFIX + name) is None  # Redis was not asked
            limiter._retry_at = time.monotonic() - 1
            limiter.reserve(name, 10)
            assert limiter._client.get(KEY_PREFIX + name) is not None  # shared again
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(messages) == 2 and "per worker" in messages[0] and "again" in messages[1], messages
    finally:
        limiter.close()


def test_rate_limit_url_takes_a_redis_url_and_picks_the_shared_limiter():
    from engine.worker.supervisor import Supervisor

    app = Engine("limits", backend="memory://", set_as_current=False)
    for good in (None, "redis://", "redis://h:6379/1", "rediss://:pw@h:6380/0", "unix:///run/redis.sock"):
        app.conf.rate_limit_url = good
    for bad in ("http://h:6379", "localhost:6379", "", "unix://", "sqlite:///x", 6379, True):
        with pytest.raises(ImproperlyConfigured, match="rate_limit_url"):
            app.conf.rate_limit_url = bad
    with pytest.raises(ImproperlyConfigured, match="rate_limit_url"):
        Engine("limits", rate_limit_url="redis:/h", set_as_current=False)
    app.conf.rate_limit_url = None  # the default: per worker
    assert type(Supervisor(app, concurrency=1, use_journal=False, hostname="w@test").rate_limiter) is RateLimiter
    app.conf.rate_limit_url = "redis://127.0.0.1:1/0"  # not connected to until a limited task comes
    sup = Supervisor(app, concurrency=1, use_journal=False, hostname="w@test")
    assert isinstance(sup.rate_limiter, RedisRateLimiter)
    sup.rate_limiter.close()
    app.close()


@pytest.mark.slow
def test_two_real_workers_share_a_limit_through_redis(redis_url, tmp_path):
    from tests import workerapp
    from tests.worker_helpers import WorkerProcess, free_endpoint

    endpoints = [free_endpoint(), free_endpoint()]
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    app = workerapp.app
    saved = {name: app.conf[name] for name in ("transport", "result_backend", "transport_bind",
                                               "producer_flush_timeout")}
    app.close()
    app.conf.update(transport=endpoints, result_backend=backend, transport_bind=False, producer_flush_timeout=30)
    env = {"ENGINE_TEST_ENDPOINT": ",".join(endpoints), "ENGINE_TEST_BACKEND": backend,
           "ENGINE_TEST_RATE_LIMIT_URL": redis_url}
    workers: list[WorkerProcess] = []
    try:
        # Worker i consumes queue "a" or "b" only: each surely gets half of the tasks.
        for i, queue in enumerate("ab"):
            workers.append(WorkerProcess("--concurrency", "2", "--bind", endpoints[i], "-Q", queue,
                                         env={**env, "ENGINE_STATE_DIR": str(tmp_path / f"state{i}")}))
        for worker in workers:
            worker.wait_ready()
        runs = tmp_path / "runs"
        results = [workerapp.limited.apply_async((str(runs), f"l{i}"), queue="ab"[i % 2]) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [f"l{i}" for i in range(20)]
        starts = sorted(float(line.split()[1]) for line in runs.read_text().splitlines())
        # limited is "10/s": shared, 20 runs take about 1.9 s; per worker (10 each) about 0.9 s.
        assert starts[-1] - starts[0] >= 1.7, [round(b - a, 3) for a, b in zip(starts, starts[1:])]
        for worker in workers:
            assert sum("limited" in line and "succeeded" in line for line in worker.lines) == 10, worker.output
            assert "per worker until Redis" not in worker.output  # shared all along, no fallback
    finally:
        app.close()
        app.conf.update(saved)
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()


@pytest.mark.slow
def test_hosts_with_skewed_clocks_share_one_schedule(redis_url, monkeypatch):
    import types

    from engine.worker import rate_limits

    here, skewed = RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)
    name = f"skew-{uuid.uuid4()}"
    try:
        now = time.time()
        assert here.reserve(name, 10, now) == now  # the first slot: at once
        # The other host's clock is an hour ahead: its slot is still 0.1 s after the first (on its clock).
        monkeypatch.setattr(rate_limits, "time", types.SimpleNamespace(time=lambda: time.time() + 3600,
                                                                       monotonic=time.monotonic))
        assert skewed.reserve(name, 10) - 3600 == pytest.approx(now + 0.1, abs=0.02)
    finally:
        here.close()
        skewed.close()
