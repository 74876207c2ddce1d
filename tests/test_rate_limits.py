"""Per-worker rate limits (issue 17, part): Celery's syntax, tasks over the limit wait in the timer heap."""

from __future__ import annotations

import time

import pytest

from engine import Engine
from engine.exceptions import ImproperlyConfigured
from engine.worker.rate_limits import RateLimiter, parse_rate


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
