"""Many client processes and several workers, as real deployments run them (issue 12).

Every web-server process is a client that sends a task now and then and stays
connected idle in between; several workers forward tasks to each other. Each
test starts real workers and client processes on loopback ports and stops
them by pid; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from engine import chain
from tests import workerapp
from tests.worker_helpers import ROOT, WorkerProcess, free_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: A client process: sends one 0.1 s task, waits for it, says so, then stays connected idle
#: until its standard input closes (like a web-server process between requests).
IDLE_CLIENT = textwrap.dedent("""
    import sys
    from tests import workerapp
    workerapp.sleepy.delay(0.1).get(timeout=60)
    print("done", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def launch(tmp_path):
    """Start workers and client processes for one test; stop every one of them afterwards."""
    started: list = []

    def worker(*args: str, env: dict) -> WorkerProcess:
        process = WorkerProcess(*args, env=env)
        started.append(process)
        return process.wait_ready()

    def client(env: dict, script: str = IDLE_CLIENT) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **env},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        return process

    launch_ = type("Launch", (), {"worker": staticmethod(worker), "client": staticmethod(client)})
    yield launch_
    workerapp.app.close()
    for process in started:
        if isinstance(process, WorkerProcess):
            if process.proc.poll() is None:
                process.kill()
        else:
            if process.poll() is None:
                process.kill()
            process.wait(10)


@pytest.mark.parametrize("mode", [["--no-fair"], ["--fair"]], ids=["fifo", "fair"])
def test_a_late_client_gets_its_task_run_while_ten_clients_sit_idle(launch, tmp_path, mode):
    endpoint = free_endpoint()
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    env = {"ENGINE_TEST_ENDPOINT": endpoint, "ENGINE_TEST_BACKEND": backend}
    launch.worker("--concurrency", "2", *mode, env=env)
    idle = [launch.client(env) for _ in range(10)]
    for client in idle:
        assert client.stdout.readline().strip() == "done"

    # Given ten connected idle clients, when one more process sends a task ...
    workerapp.app.close()
    workerapp.app.conf.update(transport=endpoint, result_backend=backend, transport_bind=False,
                              producer_flush_timeout=5)
    started = time.monotonic()
    result = workerapp.sleepy.delay(0.1)
    # ... then it runs at once (a 0.1 s task; the bound allows for a loaded 2-core machine).
    assert result.get(timeout=30) == 0.1
    assert time.monotonic() - started < 1.0


def _two_workers(launch, tmp_path, backend: str) -> tuple[str, str, dict]:
    """Worker A consumes queue ``a``, worker B queue ``b``; both know both endpoints."""
    endpoint_a, endpoint_b = free_endpoint(), free_endpoint()
    env = {"ENGINE_TEST_ENDPOINT": f"{endpoint_a},{endpoint_b}", "ENGINE_TEST_BACKEND": backend}
    launch.worker("--concurrency", "2", "--bind", endpoint_a, "-Q", "a", env=env)
    launch.worker("--concurrency", "2", "--bind", endpoint_b, "-Q", "b", env=env)
    return endpoint_a, endpoint_b, env


@pytest.mark.parametrize("connected_to", ["both", "first"])
def test_rpc_results_of_a_chain_across_two_workers_reach_the_caller(launch, tmp_path, connected_to):
    endpoint_a, endpoint_b, _ = _two_workers(launch, tmp_path, "rpc://")
    workerapp.app.close()
    # The caller is connected to both workers, or only to the one that runs the first step
    # (then the second step's states travel back through the first worker).
    transport = [endpoint_a, endpoint_b] if connected_to == "both" else [endpoint_a]
    workerapp.app.conf.update(transport=transport, result_backend="rpc://", transport_bind=False,
                              producer_flush_timeout=5)

    steps = chain(workerapp.add.s(1, 2).set(queue="a"), workerapp.add.s(10).set(queue="b"),
                  workerapp.add.s(100).set(queue="a"), workerapp.add.s(1000).set(queue="b"))
    assert steps.apply_async().get(timeout=30) == 1113

    failing = chain(workerapp.add.s(1, 2).set(queue="a"), workerapp.fails.si("second step").set(queue="b"),
                    workerapp.add.s(5).set(queue="a"))
    with pytest.raises(ValueError, match="second step"):
        failing.apply_async().get(timeout=30)
