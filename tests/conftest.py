"""Fixtures for the task API tests (the ``core`` fixture lives in the root conftest)."""

from __future__ import annotations

import pytest

from engine import Engine


@pytest.fixture
def app():
    """A fresh app whose sent messages are captured in ``app.sent`` instead of sent."""
    application = Engine("t", backend="memory://")
    application.sent = []
    application.send_message = application.sent.append
    yield application
    application.close()


@pytest.fixture
def eager_app():
    """A fresh app that runs every ``delay()`` in-process."""
    application = Engine("t", backend="memory://", task_always_eager=True)
    yield application
    application.close()


@pytest.fixture
def worker_setup(tmp_path):
    """Point ``tests.workerapp`` at a free endpoint and a fresh result file; yield a worker launcher.

    ``worker_setup(*args, extra_env=None, ready=True)`` starts ``engine-worker -A tests.workerapp``
    and returns its WorkerProcess; every worker still running is killed at teardown.
    """
    from tests import workerapp
    from tests.worker_helpers import WorkerProcess, free_endpoint

    endpoint = free_endpoint()
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    app = workerapp.app
    app.close()
    app.conf.update(transport=endpoint, result_backend=backend, transport_bind=False, producer_flush_timeout=30)
    env = {"ENGINE_TEST_ENDPOINT": endpoint, "ENGINE_TEST_BACKEND": backend}
    workers: list = []

    def start(*args: str, extra_env: dict | None = None, ready: bool = True, app_module: str = "tests.workerapp"):
        worker = WorkerProcess(*args, env={**env, **(extra_env or {})}, app=app_module)
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    start.endpoint, start.backend, start.env, start.tmp = endpoint, backend, env, tmp_path
    yield start
    app.close()
    for worker in workers:
        if worker.proc.poll() is None:
            worker.kill()
