"""Stop signals sent to the worker's whole process group (systemd, supervisord, ``kill -- -PGID``, Ctrl-C).

Only the supervisor decides when its children stop: a warm shutdown lets a running
task finish however the signal arrived, and a cold one leaves it in the journal.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from engine import states
from tests import workerapp
from tests.worker_helpers import pids_alive, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def exit_status(worker, timeout=30):
    try:
        return worker.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker did not stop within {timeout}s:\n{worker.output}") from None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_warm_stop_signal_to_the_process_group_lets_the_running_task_finish(worker_setup, signum):
    worker = worker_setup("--concurrency", "2")
    children = [p.pid for p in worker.children()]
    result = workerapp.tracked_sleep.delay(2.0)
    wait_until(lambda: result.state == states.STARTED, 20, message="the task started")
    os.killpg(worker.pid, signum)  # WorkerProcess starts a session: its pid is the group id
    assert exit_status(worker) == 0
    assert result.get(timeout=10, propagate=False) == 2.0, (result.state, result.result, worker.output)
    assert result.state == states.SUCCESS
    assert "WorkerLostError" not in worker.output and "exited (status" not in worker.output
    assert pids_alive(children) == []


def test_cold_stop_signal_to_the_process_group_keeps_the_running_task_for_the_next_start(worker_setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = worker_setup("--concurrency", "2", extra_env=state)
    children = [p.pid for p in worker.children()]
    result = workerapp.tracked_sleep.delay(1.0)
    wait_until(lambda: result.state == states.STARTED, 20, message="the task started")
    os.killpg(worker.pid, signal.SIGQUIT)
    assert exit_status(worker) == 3
    assert pids_alive(children) == []
    assert result.state == states.STARTED  # killed by its supervisor, not failed by a stray signal
    restarted = worker_setup("--concurrency", "1", extra_env=state)
    assert result.get(timeout=30) == 1.0
    assert "replaying 1 task(s)" in restarted.output
