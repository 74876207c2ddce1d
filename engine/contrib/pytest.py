"""Fixtures for testing code that uses the engine: a real worker in a subprocess, or eager calls.

Enable them (they are off by default; see :mod:`engine.contrib.pytest_switch`)
and name your app in the pytest ini file::

    # pytest.ini
    [pytest]
    engine_plugin = true
    engine_app = proj.tasks:app

    # test_tasks.py
    from proj.tasks import add

    def test_add_through_a_real_worker(engine_worker):
        assert add.delay(2, 2).get(timeout=10) == 4

    def test_add_eagerly(engine_eager):
        assert add.delay(2, 2).get() == 4

Fixtures:

* ``engine_config`` (override it): settings applied to the app, e.g.
  ``{"task_default_queue": "tests"}``;
* ``engine_worker_parameters`` (override it): extra ``engine-worker``
  arguments, default ``["--concurrency", "2"]``;
* ``engine_app``: the app of ``engine_app`` (the ini option, or override the
  ``engine_app_spec`` fixture), pointed at a free loopback endpoint and a
  SQLite result store of the test's own, its settings restored afterwards;
* ``engine_worker``: ``engine-worker -A <the app>`` in a subprocess on that
  endpoint, ready before the test starts, stopped (warm, then killed) and
  reaped after; its log is added to the report of a failing test. The value
  is an :class:`EngineWorker` (``pid``, ``log``, ``stop()``);
* ``engine_eager``: the app with ``task_always_eager`` (and
  ``task_eager_propagates``): calls run in the test's process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from engine.app import Engine

__all__ = ("EngineWorker",)

#: Seconds a worker gets to say it is ready, and to stop.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
#: Settings the fixtures change on the app and restore afterwards.
_POINTED = ("transport", "transport_bind", "result_backend", "producer_flush_timeout")
#: Seconds the app's client waits at the end of a test for a worker to take what it sent: a test
#: whose worker never came must not hang the run.
FLUSH_TIMEOUT = 10.0


#: Runs the worker's command line (its arguments) with SIGTERM as its parent-death signal (Linux).
_DIE_WITH_TESTS = ("import ctypes, os, signal, sys\n"
                   "try:\n"
                   "    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
                   "except (OSError, AttributeError):\n"
                   "    pass\n"
                   "os.execv(sys.argv[1], sys.argv[1:])\n")


class EngineWorker:
    """One ``engine-worker`` subprocess: its pid, its output so far, and how to stop it."""

    def __init__(self, app_spec: str, endpoint: str, backend: str, state_dir: str, cwd: str,
                 arguments: list[str]) -> None:
        env = {**os.environ, "ENGINE_STATE_DIR": state_dir, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH", "")) if p)
        self.argv = [sys.executable, "-m", "engine.cli", "-A", app_spec, "--bind", endpoint, "--backend", backend,
                     "--loglevel", "INFO", *arguments]
        # Through a one-line launcher that asks Linux to stop the worker (warm) if the test run dies
        # (a timeout, Ctrl-C twice): no worker is left behind by a run that never reached teardown.
        self.proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_TESTS, *self.argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.rstrip().endswith("ready."):
                self._ready.set()

    @property
    def log(self) -> str:
        """Everything the worker printed so far."""
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = READY_TIMEOUT, answers: Callable[[], bool] | None = None) -> None:
        """Block until the worker is serving; kill it and fail with its log otherwise.

        Serving: its "ready." line, or ``answers()`` true (a control ping: the line
        may go to a log file, or be JSON, or be left to the app's own logging).
        """
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if answers is not None and answers():
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"engine-worker did not start (exit status {self.proc.returncode}):\n{self.log}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL of its whole session after ``timeout``; reaped either way."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def _free_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def engine_config() -> dict[str, Any]:
    """Settings the engine fixtures apply to the app (override this fixture)."""
    return {}


@pytest.fixture
def engine_worker_parameters() -> list[str]:
    """Extra ``engine-worker`` arguments (override this fixture)."""
    return ["--concurrency", "2"]


@pytest.fixture
def engine_app_spec(request: pytest.FixtureRequest) -> str:
    """The app, as ``engine-worker -A`` takes it: the ``engine_app`` ini option (override this fixture)."""
    spec = str(request.config.getini("engine_app") or "")
    if not spec:
        pytest.fail("the engine fixtures need the app: set engine_app = 'module:attr' in the pytest ini file, "
                    "or override the engine_app_spec fixture")
    return spec


@pytest.fixture
def engine_app(engine_app_spec: str, engine_config: dict[str, Any], tmp_path: Any) -> Iterator[Engine]:
    """The app, on a free loopback endpoint and a results file of this test's own; restored afterwards."""
    from engine.cli import find_app

    app = find_app(engine_app_spec)
    saved = {name: app.conf[name] for name in {*_POINTED, *engine_config}}
    app.close()
    app.conf.update(transport=_free_endpoint(), transport_bind=False,
                    result_backend=f"sqlite:///{tmp_path / 'engine-results.db'}", producer_flush_timeout=FLUSH_TIMEOUT)
    app.conf.update(engine_config)
    try:
        yield app
    finally:
        app.close()
        app.conf.update(saved)


@pytest.fixture
def engine_worker(request: pytest.FixtureRequest, engine_app: Engine, engine_app_spec: str,
                  engine_worker_parameters: list[str], tmp_path: Any) -> Iterator[EngineWorker]:
    """A real engine-worker for ``engine_app``, ready before the test, stopped and reaped after."""
    transport = engine_app.conf.transport
    endpoint = transport if isinstance(transport, str) else transport[0]
    arguments = list(engine_worker_parameters)
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in arguments):
        # The worker imports the app afresh: it consumes the queue the test's app sends to.
        arguments += ["--queues", engine_app.conf.task_default_queue]
    worker = EngineWorker(engine_app_spec, endpoint, engine_app.conf.result_backend, str(tmp_path / "engine-state"),
                          str(request.config.rootpath), arguments)
    request.node.engine_worker = worker  # its log goes into a failing test's report
    try:
        worker.wait_ready(answers=lambda: bool(engine_app.control.ping(timeout=0.2, endpoints=[endpoint])))
        yield worker
    finally:
        engine_app.close()  # the client's messages flushed (bounded) while the worker still runs
        worker.stop()


@pytest.fixture
def engine_eager(engine_app: Engine) -> Iterator[Engine]:
    """The app with calls run eagerly, in this process (``task_always_eager``, exceptions propagated)."""
    saved = {name: engine_app.conf[name] for name in ("task_always_eager", "task_eager_propagates")}
    engine_app.conf.update(task_always_eager=True, task_eager_propagates=True)
    try:
        yield engine_app
    finally:
        engine_app.conf.update(saved)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Add the worker's log to the report of a test that failed while it ran."""
    report = yield
    worker = getattr(item, "engine_worker", None)
    if worker is not None and report.failed:
        report.sections.append(("engine-worker log", worker.log or "(nothing printed)"))
    return report
