"""``retry(max_retries=N)`` overrides the limit for that call only, never for the task's next calls.

The override reaches the automatic retry of the same call (a ``retry(exc=...)``
past its own limit raises ``exc``, which ``autoretry_for`` catches), but a task
is one instance per process: an override kept on it would leak into every later
call in that process, in a worker child as in eager mode.
"""

from __future__ import annotations

import pytest

from engine import Engine, states
from tests import workerapp


def make_task(app, attempts):
    @app.task(bind=True, autoretry_for=(ValueError,), max_retries=0, default_retry_delay=0)
    def override_then_fail(self, mode):
        attempts.append((mode, self.request.retries))
        if mode == "override" and self.request.retries == 0:
            raise self.retry(max_retries=1)
        if mode == "fail":
            raise ValueError(f"attempt {self.request.retries}")
        return self.request.retries

    return override_then_fail


def test_eager_override_does_not_leak_into_the_next_call():
    attempts: list = []
    task = make_task(Engine("proj", backend="memory://"), attempts)
    assert task.apply(("override",)).get() == 1  # its own max_retries=1 allowed one retry
    result = task.apply(("fail",))
    assert result.state == states.FAILURE
    assert str(result.result) == "attempt 0"  # the task's own max_retries=0: no retry
    assert attempts == [("override", 0), ("override", 1), ("fail", 0)]
    assert "override_max_retries" not in vars(task)


def test_eager_override_does_not_leak_through_always_eager_delay():
    attempts: list = []
    task = make_task(Engine("proj", backend="memory://", task_always_eager=True), attempts)
    task.delay("override")
    assert str(task.delay("fail").result) == "attempt 0"


def test_override_still_reaches_the_automatic_retry_of_the_same_call():
    app = Engine("proj", backend="memory://")
    attempts: list = []

    @app.task(bind=True, autoretry_for=(ValueError,), max_retries=5, default_retry_delay=0)
    def gives_up_early(self):
        attempts.append(self.request.retries)
        # Past its own limit retry() raises the ValueError, which autoretry_for catches:
        # the automatic retry must apply this call's limit, not max_retries=5.
        raise self.retry(exc=ValueError("gave up"), max_retries=0)

    result = gives_up_early.apply()
    assert result.state == states.FAILURE and str(result.result) == "gave up"
    assert attempts == [0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_override_does_not_leak_into_the_next_call_in_the_same_child(worker_setup):
    worker = worker_setup("--concurrency", "1")
    child = [p.pid for p in worker.children()]
    assert workerapp.override_then_fail.delay("override").get(timeout=20) == 1
    with pytest.raises(ValueError, match="^attempt 0$"):  # the task's own max_retries=0
        workerapp.override_then_fail.delay("fail").get(timeout=20)
    assert [p.pid for p in worker.children()] == child  # both calls ran in that one child
