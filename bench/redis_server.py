"""A throw-away ``redis-server`` for the benchmarks and the tests, bounded in time, stopped by pid.

The server listens on a free loopback port with persistence off, so it
writes nothing to disk and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

from bench.harness import free_port

__all__ = ("RedisServer", "missing")


def missing() -> str | None:
    """None when a Redis server can be started here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (e.g. apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed"
    return None


class RedisServer:
    """One ``redis-server`` subprocess on a free loopback port."""

    def __init__(self, executable: str = "redis-server", host: str = "127.0.0.1") -> None:
        self.executable = executable
        #: The address it listens on (loopback unless a test's own network namespace lab says otherwise).
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    @property
    def url(self) -> str:
        """``redis://<host>:<port>/0`` of the running server."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0, attempts: int = 3) -> RedisServer:
        """Start the server and wait (at most ``timeout`` per attempt) until it answers PING.

        The free port can be taken by someone else between finding and binding
        it, so a server that exits at once is retried on a new port.
        """
        last_error = ""
        for _ in range(attempts):
            self.port = free_port()
            # Output goes to a temp file, not a pipe nobody reads (a full pipe would block it).
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives until stop()
            # Protected mode refuses clients that are not on loopback: off for a test lab's private bridge.
            protected = "yes" if self.host.startswith("127.") else "no"
            self.proc = subprocess.Popen(
                [self.executable, "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--bind", self.host, "--protected-mode", protected, "--dir", tempfile.gettempdir()],
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ping(timeout):
                return self
            last_error = self.output()
            self.stop()
        raise RuntimeError(f"redis-server did not answer PING after {attempts} attempts:\n{last_error}")

    def _wait_ping(self, timeout: float) -> bool:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                client = redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    if client.ping():
                        return True
                finally:
                    client.close()
            except redis.RedisError:
                pass
            time.sleep(0.05)
        return False

    def output(self) -> str:
        """What the server printed so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server by pid; kill it if it has not exited within ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
