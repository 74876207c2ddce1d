"""Scenarios 1 and 3 on Dramatiq with a Redis broker, in the same run (a second peer beside Celery).

Used by ``python -m bench run`` when ``dramatiq`` is installed (the ``bench``
extra) and ``redis-server`` is on PATH. Settings are what a knowledgeable user
picks: one process per unit of concurrency with one thread each (the tasks
are CPU-bound), a queue prefetch of 64, results in Redis only for the round
trips (``store_results=True`` on ``add``; ``get_result(block=True)`` waits on
Redis, it does not poll).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import redis_server, scenarios
from bench.harness import ROOT, Worker, stop_process

__all__ = ("DramatiqWorker", "available", "latency", "throughput")

#: Messages each worker thread's consumer fetches ahead.
PREFETCH = 64


def available() -> str | None:
    """None when the comparison can run, else why not."""
    try:
        import dramatiq  # noqa: F401
    except ImportError:
        return "dramatiq is not installed (pip install -e '.[bench]')"
    return redis_server.missing()


class DramatiqWorker:
    """``dramatiq bench.dramatiq_app`` with the same completion counters as the engine's bench worker."""

    def __init__(self, redis_url: str, concurrency: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dramatiq-bench-"))
        self.counters = self.tmp / "counters"
        self.counters.mkdir()
        self.env = {"BENCH_DRAMATIQ_REDIS": redis_url, "BENCH_COUNTER_DIR": str(self.counters),
                    "dramatiq_queue_prefetch": str(PREFETCH)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "bench.dramatiq_app", "--processes", str(concurrency),
             "--threads", "1", "--skip-logging"],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            from bench import dramatiq_app

            dramatiq_app.use(redis_url)  # this process sends to the same Redis
            self.tasks = dramatiq_app
            # Dramatiq has no ping: the first no-op task's completion says the worker is up.
            self.tasks.noop.send(0, 0)
            self.wait_completed(1, 60)
        except TimeoutError:
            self.stop()
            raise RuntimeError("dramatiq worker did not start") from None
        except BaseException:
            self.stop()
            raise

    completed = Worker.completed
    wait_completed = Worker.wait_completed

    def stop(self) -> None:
        """Warm shutdown (killed after 30 s), then its files are removed."""
        stop_process(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _flushed_redis(redis_url: str) -> str:
    """``redis_url`` on its database 1, emptied (Celery uses database 0 of the same server)."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/1"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def throughput(redis_url: str, tasks: int, concurrency: int) -> dict:
    """Scenario 1 on Dramatiq: no-op tasks, no results, first send to last completion."""
    worker = DramatiqWorker(_flushed_redis(redis_url), concurrency)
    try:
        return scenarios.time_noops(lambda i: worker.tasks.noop.send(i, i), worker, tasks)
    finally:
        worker.stop()


def latency(redis_url: str, tasks: int, concurrency: int) -> dict:
    """Scenario 3 on Dramatiq: one ``add`` at a time, send to result (Redis result backend)."""
    worker = DramatiqWorker(_flushed_redis(redis_url), concurrency)
    try:
        return scenarios.time_round_trips(
            lambda i: worker.tasks.add.send(i, 1).get_result(block=True, timeout=30_000), min(tasks, 500))
    finally:
        worker.stop()
