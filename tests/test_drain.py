"""Draining on scale-down (issue 17, part): --shutdown-timeout hands unstarted tasks back; the journal ends empty."""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from engine import states
from tests import workerapp
from tests.worker_helpers import WorkerProcess, free_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def journal_rows(path: str) -> int:
    with sqlite3.connect(path) as db:
        return sum(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("frames", "journal"))


@pytest.fixture
def pair(tmp_path):
    """A client app on two endpoints; start(i, *args) starts the worker of endpoint i; all killed after."""
    endpoints = [free_endpoint(), free_endpoint()]
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    app = workerapp.app
    app.close()
    app.conf.update(transport=endpoints, result_backend=backend, transport_bind=False, producer_flush_timeout=30)
    workers: list[WorkerProcess] = []

    def start(index: int, *args: str) -> WorkerProcess:
        # Its app names both workers: what it sends on itself (draining) can reach the other one.
        env = {"ENGINE_TEST_ENDPOINT": ",".join(endpoints), "ENGINE_TEST_BACKEND": backend,
               "ENGINE_STATE_DIR": str(tmp_path / f"state{index}")}
        worker = WorkerProcess("--bind", endpoints[index], *args, env=env).wait_ready()
        workers.append(worker)
        return worker

    yield start
    app.close()
    for worker in workers:
        worker.kill()


def test_a_drained_worker_hands_back_what_it_did_not_start_and_leaves_an_empty_journal(pair, tmp_path):
    journal = str(tmp_path / "a.db")
    # --fair: a child holds only the task it runs, so the others wait in the supervisor (handed back).
    first = pair(0, "--concurrency", "1", "--fair", "--shutdown-timeout", "20", "--journal", journal,
                 "-n", "first@test")
    blocker = workerapp.sleepy.delay(3.0)
    later = workerapp.add.apply_async((100, 100), countdown=10)  # an ETA task held by the first worker
    queued = [workerapp.add.delay(i, i) for i in range(30)]  # its credit window takes a few, the client the rest
    control = workerapp.app.control
    deadline = time.monotonic() + 30
    while True:
        stats = control.inspect(timeout=5, destination=["first@test"]).stats() or {}
        held = stats.get("first@test", {})
        if held.get("scheduled") == 1 and held.get("waiting", 0) >= 2:  # the credit window bounds the rest
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.05)
    second = pair(1, "--concurrency", "2", "-n", "second@test")
    first.proc.send_signal(15)  # SIGTERM: drain
    assert first.proc.wait(30) == 0
    assert blocker.get(timeout=30) == 3.0  # it was running: it finished before the exit
    assert [r.get(timeout=30) for r in queued] == [2 * i for i in range(30)]
    assert later.get(timeout=30) == 200
    assert journal_rows(journal) == 0  # nothing left behind on the first worker's disk
    handed = re.search(r"draining: (\d+) task\(s\) not started go back", first.output)
    assert handed and int(handed.group(1)) >= 3  # the ETA task and those waiting for the child
    assert second.proc.poll() is None


def test_past_the_deadline_running_tasks_are_stopped_and_run_elsewhere(pair, tmp_path):
    journal = str(tmp_path / "a.db")
    runs = tmp_path / "runs"
    first = pair(0, "--concurrency", "1", "--shutdown-timeout", "0.5", "--journal", journal)
    slow = workerapp.log_run.delay(str(runs), "slow", 2.0)
    control = workerapp.app.control
    deadline = time.monotonic() + 30
    first_only = [workerapp.app.conf.transport[0]]
    while not any(tasks for tasks in (control.inspect(timeout=5, endpoints=first_only).active() or {}).values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pair(1, "--concurrency", "1")
    first.proc.send_signal(15)
    assert first.proc.wait(30) == 0
    assert slow.get(timeout=30) == "slow"  # stopped on the first worker, run again on the second
    assert workerapp.app.AsyncResult(slow.id).state == states.SUCCESS
    assert journal_rows(journal) == 0
    assert len(runs.read_text().splitlines()) == 1  # the first run never finished


def test_a_retry_waiting_for_its_countdown_is_sent_on_to_another_worker(pair, tmp_path):
    journal = str(tmp_path / "a.db")
    first = pair(0, "--concurrency", "1", "--shutdown-timeout", "2", "--journal", journal, "-n", "first@test")
    result = workerapp.retries_later.delay(4)  # its retry comes from the task itself: no client to hand it to
    deadline = time.monotonic() + 30
    while result.state != states.RETRY:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pair(1, "--concurrency", "1")
    first.proc.send_signal(15)
    assert first.proc.wait(30) == 0
    assert result.get(timeout=30) == "retried"  # ran on the second worker
    assert journal_rows(journal) == 0
