"""A script whose tasks no worker takes: at exit it says so at once, stops when bounded, and Ctrl-C ends it cleanly.

Each test runs a real script in a subprocess that sends tasks to a free
endpoint no worker listens on; every wait is bounded and the script is
killed in a ``finally``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.worker_helpers import ROOT, free_endpoint

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import sys

    from engine import Engine

    timeout = None if sys.argv[2] == "none" else float(sys.argv[2])
    app = Engine("script", transport=sys.argv[1], producer_flush_timeout=timeout)

    @app.task
    def add(x, y):
        return x + y

    for i in range(3):
        add.delay(i, i)
    print("sent", flush=True)
""")


class Script:
    """The script's process, its stderr read line by line in a thread."""

    def __init__(self, tmp_path, flush_timeout: str) -> None:
        path = tmp_path / "script.py"
        path.write_text(SCRIPT)
        self.endpoint = free_endpoint()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(path), self.endpoint, flush_timeout], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.proc.stdout.readline()  # "sent": the script's own work is done, exit begins now
        self.exit_began = time.monotonic()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for_line(self, text: str, timeout: float) -> float:
        """Wait for a stderr line containing ``text``; return when it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            time.sleep(0.01)
        raise AssertionError(f"no stderr line with {text!r} within {timeout}s:\n{self.stderr}")

    def wait(self, timeout: float) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_bounded_exit_flush_says_at_once_what_is_pending_and_stops_in_time(tmp_path):
    script = Script(tmp_path, "1")
    try:
        status = script.wait(20)
        elapsed = time.monotonic() - script.exit_began
        assert elapsed < 5, script.stderr
        assert status == 0
        warned = script.wait_for_line("waiting", 1)
        assert warned - script.exit_began < 1.0  # not after FLUSH_WARN_EVERY (5 s)
        first = next(line for _, line in script.lines if "waiting" in line)
        assert "3 task(s)" in first and script.endpoint in first and "producer_flush_timeout" in first
        assert "3 task(s) not acknowledged" in script.stderr
        assert "Traceback" not in script.stderr
    finally:
        script.kill()


def test_unbounded_exit_flush_says_at_once_how_to_bound_it(tmp_path):
    script = Script(tmp_path, "none")
    try:
        warned = script.wait_for_line("waiting", 3)
        assert warned - script.exit_began < 1.0
        first = next(line for _, line in script.lines if "waiting" in line)
        assert "3 task(s)" in first and script.endpoint in first
        assert "producer_flush_timeout" in first and "Ctrl-C" in first
        assert script.proc.poll() is None  # nothing is dropped silently: it keeps waiting
    finally:
        script.kill()


def test_ctrl_c_during_the_exit_flush_ends_it_cleanly_in_one_line(tmp_path):
    script = Script(tmp_path, "none")
    try:
        script.wait_for_line("waiting", 3)
        before = len(script.lines)
        script.proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        script.wait(10)
        assert time.monotonic() - interrupted < 5
        after = [line for _, line in script.lines[before:]]
        assert len(after) == 1, script.stderr
        assert "3 task(s)" in after[0] and "not handed over" in after[0] and script.endpoint in after[0]
        assert "Traceback" not in script.stderr and "KeyboardInterrupt" not in script.stderr
    finally:
        script.kill()
