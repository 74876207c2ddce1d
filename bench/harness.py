"""Start and stop the real ``engine-worker`` for the end-to-end benchmarks."""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks source ports of outgoing connections from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(*hosts: str) -> int:
    """A TCP port that nothing listens on right now, on every one of ``hosts`` (default 127.0.0.1).

    Picked below the kernel's ephemeral range: a port bound to 0 and released comes from that
    range, where any outgoing connection (a client's reconnect, a Redis client) may take it as its
    source port before the worker binds it. Outside the range only an explicit bind can.
    """
    hosts = hosts or ("127.0.0.1",)
    low, high = _ephemeral_ports()
    first, last = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(200):
        port = random.randint(first, last)
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port in {first}-{last} on {', '.join(hosts)}")


def free_endpoint() -> str:
    """A loopback tcp endpoint nothing listens on."""
    return f"tcp://127.0.0.1:{free_port()}"


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time (user + system) ``proc`` has used so far."""
    times = proc.cpu_times()
    return times.user + times.system


def stop_process(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM (warm shutdown), then SIGKILL of its whole session after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Worker:
    """An ``engine-worker -A bench.apps`` subprocess with its own endpoint, backend and counters."""

    def __init__(self, concurrency: int, *extra: str, backend: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
        self.counters = self.tmp / "counters"
        self.starts = self.tmp / "starts"
        self.counters.mkdir()
        self.starts.mkdir()
        self.endpoint = free_endpoint()
        if backend == "sqlite":
            backend = f"sqlite:///{self.tmp / 'results.db'}"
        elif backend == "rpc":
            backend = "rpc://"
        self.env = {
            "BENCH_ENDPOINT": self.endpoint,
            "BENCH_BACKEND": backend or "",
            "BENCH_COUNTER_DIR": str(self.counters),
            "BENCH_STARTS_DIR": str(self.starts),
            "ENGINE_STATE_DIR": str(self.tmp / "state"),  # the worker's journal
        }
        self.argv = [sys.executable, "-m", "engine.cli", "-A", "bench.apps", "--concurrency", str(concurrency),
                     "--loglevel", "WARNING", *extra]
        try:
            self._start()
        except BaseException:
            if getattr(self, "proc", None) is not None:
                stop_process(self.proc)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _start(self) -> None:
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env}, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        banner = []
        for line in self.proc.stderr:  # the banner ends with the core line
            banner.append(line)
            if line.startswith("  core:"):
                break
        else:
            raise RuntimeError("engine-worker exited before it was ready:\n" + "".join(banner[-20:]))
        # Keep reading its stderr (warnings, errors), so a full pipe can never block the worker.
        self.log = collections.deque(maxlen=200)
        threading.Thread(target=self.log.extend, args=(self.proc.stderr,), daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)

    def restart(self) -> None:
        """Warm shutdown, then the same worker again: same endpoint, same journal and state."""
        self.stop()
        self._start()

    def app(self):
        """The bench app, pointed at this worker (a fresh producer)."""
        from bench import apps

        apps.app.close()
        apps.app.conf.update(transport=self.endpoint, result_backend=self.env["BENCH_BACKEND"] or None)
        return apps

    def completed(self) -> int:
        """No-op tasks finished so far."""
        from bench.apps import completed

        return completed(str(self.counters))

    def wait_completed(self, count: int, timeout: float = 600) -> float:
        """Wait until ``count`` no-op tasks finished; return the time it happened."""
        deadline = time.monotonic() + timeout
        while self.completed() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.completed()} of {count} tasks completed in {timeout}s")
            time.sleep(0.0005)
        return time.perf_counter()

    def rss(self) -> tuple[int, list[int]]:
        """Resident memory of the supervisor and of each child, in bytes."""
        children = self.ps.children()
        return self.ps.memory_info().rss, [c.memory_info().rss for c in children]

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) used so far by the supervisor, and by its live children together."""
        return cpu_seconds(self.ps), sum(cpu_seconds(child) for child in self.ps.children())

    def runs(self) -> list[tuple[str, float, float, float]]:
        """``(kind, sent, start, end)`` of every timed task."""
        rows = []
        for path in self.starts.iterdir():
            for line in path.read_text().splitlines():
                kind, sent, start, end = line.split()
                rows.append((kind, float(sent), float(start), float(end)))
        return rows

    def stop(self) -> None:
        """Warm shutdown (killed after 30 s)."""
        from bench import apps

        apps.app.close()
        stop_process(self.proc)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)  # counters, start logs, journal, results
