"""A child reports what finished before it starts a task that may run long (real worker)."""

from __future__ import annotations

import pytest

from engine import states
from engine.exceptions import TimeLimitExceeded
from tests import workerapp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_long_task_behind_tiny_ones_has_its_own_time_limit_and_does_not_hold_their_results(worker_setup):
    worker_setup("--concurrency", "1")
    # Given one child that gets two tiny tasks and then a long one in one batch ...
    first, second = workerapp.add.delay(1, 1), workerapp.add.delay(2, 2)
    long_one = workerapp.sleepy.apply_async((6,), time_limit=1)
    # ... the tiny tasks' results come while the long one runs (not 6 s later) ...
    assert second.get(timeout=4) == 4 and first.get(timeout=1) == 2
    # ... and the long one is killed at its own 1 s limit: the supervisor knew it was the running one.
    with pytest.raises(TimeLimitExceeded):
        long_one.get(timeout=5)
    assert workerapp.app.AsyncResult(first.id).state == states.SUCCESS
