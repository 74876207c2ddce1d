"""Start and stop real ``engine-worker`` processes from tests, bounded in time, leaving none behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.harness import free_endpoint, free_port  # noqa: F401 - the tests' helpers too

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """One ``engine-worker`` subprocess and its output."""

    def __init__(self, *args: str, env: dict | None = None, app: str = "tests.workerapp",
                 prefix: tuple[str, ...] | list[str] = ()) -> None:
        """Start ``engine-worker -A app args``; ``prefix`` runs it inside something (e.g. ``ip netns exec NS``)."""
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        # Journals go to a fresh directory unless a test shares one between workers on purpose.
        full_env.setdefault("ENGINE_STATE_DIR", tempfile.mkdtemp(prefix="engine-state-"))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "engine.cli", "-A", app, "--loglevel", "INFO", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, text=True,
            start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.rstrip().endswith("ready."):
                self._ready.set()

    @property
    def output(self) -> str:
        """Everything the worker printed so far."""
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        """Block until the worker printed its ready line; fail with its output otherwise."""
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError(f"worker not ready within {timeout}s:\n{self.output}")
        return self

    def children(self) -> list[psutil.Process]:
        """The pool children alive now."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def wait_for_line(self, text: str, timeout: float = 20) -> str:
        """Wait until a line containing ``text`` is printed and return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} within {timeout}s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit status (killing everything on timeout)."""
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not stop within {timeout}s after {sig}:\n{self.output}") from None

    def kill(self) -> None:
        """Kill the worker and its children, by pid."""
        procs = self.children()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def wait_until(predicate, timeout: float = 20, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} not met within {timeout}s")


def pids_alive(pids) -> list[int]:
    """Those of ``pids`` that are still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive
