"""Fault test: thousands of tasks while pool children, a supervisor and a second worker are SIGKILLed.

Every task must end with a final state (SUCCESS, or FAILURE with WorkerLostError
for the one a killed child was running); duplicates are allowed (at-least-once)
and reported. CI runs a smaller batch; the full run is

    ENGINE_CHAOS_TASKS=20000 python3 -m pytest tests/test_chaos.py -s
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time

import pytest

from engine import states
from tests import workerapp
from tests.worker_helpers import WorkerProcess, free_endpoint

TASKS = int(os.environ.get("ENGINE_CHAOS_TASKS", "3000"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def two_workers(tmp_path, concurrency: str, **settings):
    """Two workers on free endpoints, each with its own journal, one SQLite backend; the app points at both."""
    endpoints = [free_endpoint(), free_endpoint()]
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    env = [{"ENGINE_TEST_ENDPOINT": e, "ENGINE_TEST_BACKEND": backend, "ENGINE_STATE_DIR": str(tmp_path / f"s{i}")}
           for i, e in enumerate(endpoints)]
    app = workerapp.app
    app.close()
    app.conf.update(transport=endpoints, result_backend=backend, transport_bind=False, **settings)
    workers = [WorkerProcess("--concurrency", concurrency, "--bind", endpoints[i], env=env[i]).wait_ready()
               for i in (0, 1)]
    return endpoints, env, workers


def test_nothing_is_lost_while_processes_are_killed(tmp_path):
    endpoints, env, workers = two_workers(tmp_path, "2", producer_flush_timeout=60, transport_ack_timeout=3.0)
    app = workerapp.app
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    kills = collections.Counter()
    rng = random.Random(7)
    try:
        ids = []
        for number in range(TASKS):
            ids.append(workerapp.mark.delay(str(runs_dir), number).id)
            if number and number % max(1, TASKS // 12) == 0:
                victim = rng.choice(["child", "child", "supervisor", "second"])
                index = 0 if victim == "supervisor" else 1 if victim == "second" else rng.randrange(2)
                worker = workers[index]
                if victim == "child":
                    children = worker.children()
                    if children:
                        try:
                            os.kill(rng.choice(children).pid, signal.SIGKILL)
                            kills["child"] += 1
                        except ProcessLookupError:  # it ended (and was reaped) since it was listed
                            pass
                else:
                    os.kill(worker.pid, signal.SIGKILL)
                    worker.proc.wait(10)
                    kills[victim] += 1
                    workers[index] = WorkerProcess("--concurrency", "2", "--bind", endpoints[index],
                                                   env=env[index]).wait_ready()
        deadline = time.monotonic() + 300
        missing = ids
        while missing and time.monotonic() < deadline:
            missing = [task_id for task_id in missing
                       if app.AsyncResult(task_id).state not in states.READY_STATES]
            if missing:
                time.sleep(0.5)
        finals = collections.Counter(app.AsyncResult(task_id).state for task_id in ids)
        executions = collections.Counter()
        for path in runs_dir.iterdir():
            executions.update(int(line) for line in path.read_text().split())
        duplicates = sum(n - 1 for n in executions.values() if n > 1)
        print(f"\nchaos: sent {len(ids)}, final states {dict(finals)}, lost {len(missing)}, "
              f"ran twice or more {duplicates}, kills {dict(kills)}")
        assert not missing, f"{len(missing)} task(s) without a final state"
        assert sum(kills.values()) >= 8
    finally:
        app.close()
        for worker in workers:
            worker.kill()


def test_tasks_sent_to_a_hung_worker_move_to_another(tmp_path):
    _, _, workers = two_workers(tmp_path, "1", producer_flush_timeout=30, transport_ack_timeout=10.0)
    app = workerapp.app
    try:
        assert workerapp.add.delay(1, 1).get(timeout=20) == 2  # both connected
        os.kill(workers[0].pid, signal.SIGSTOP)
        started = time.monotonic()
        results = [workerapp.add.delay(i, 0) for i in range(50)]
        assert [r.get(timeout=40) for r in results] == list(range(50))
        assert time.monotonic() - started < 30
    finally:
        os.kill(workers[0].pid, signal.SIGCONT)
        app.close()
        for worker in workers:
            worker.kill()


def test_a_restarted_client_loses_nothing_it_had_handed_over(tmp_path):
    import subprocess
    import sys
    import textwrap

    from tests.worker_helpers import ROOT

    endpoint = free_endpoint()
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    env = {**os.environ, "ENGINE_TEST_ENDPOINT": endpoint, "ENGINE_TEST_BACKEND": backend,
           "ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = WorkerProcess("--concurrency", "2", env=env).wait_ready()
    client = textwrap.dedent("""
        import sys, time
        from tests import workerapp
        ids = [workerapp.sleepy.delay(0.001).id for _ in range(int(sys.argv[1]))]
        workerapp.app.producer.flush(30)   # every message acknowledged by the worker
        print(" ".join(ids), flush=True)
        time.sleep(60)                     # killed here, results still being produced
    """)
    try:
        ids = []
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, "-c", client, "1500"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, text=True)
            ids += proc.stdout.readline().split()
            proc.kill()
            proc.wait(10)
        app = workerapp.app
        app.close()
        app.conf.update(transport=endpoint, result_backend=backend)
        assert len(ids) == 3000
        assert all(app.AsyncResult(i).get(timeout=60) == 0.001 for i in ids)
    finally:
        workerapp.app.close()
        worker.kill()
