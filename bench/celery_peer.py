"""Scenarios 1, 3 and 4 on Celery's prefork worker with a Redis broker, in the same run.

Used by ``python -m bench run`` when ``celery`` is installed (the ``bench``
extra) and ``redis-server`` is on PATH; the harness starts its own Redis on a
free port and stops it by pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import redis_server, scenarios
from bench.harness import ROOT, Worker, stop_process

__all__ = ("CeleryWorker", "available", "chord", "fair", "fairness", "latency", "throughput")


def available() -> str | None:
    """None when the comparison can run, else why not."""
    try:
        import celery  # noqa: F401
    except ImportError:
        return "celery is not installed (pip install -e '.[bench]')"
    return redis_server.missing()


class CeleryWorker:
    """``celery -A bench.celery_app worker`` with the same counters as the engine's bench worker."""

    def __init__(self, broker: str, concurrency: int, *extra: str, prefetch: int = 4) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="celery-bench-"))
        self.counters = self.tmp / "counters"
        self.starts = self.tmp / "starts"
        self.counters.mkdir()
        self.starts.mkdir()
        self.env = {"BENCH_CELERY_BROKER": broker, "BENCH_CELERY_PREFETCH": str(prefetch),
                    "BENCH_COUNTER_DIR": str(self.counters), "BENCH_STARTS_DIR": str(self.starts)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat", *extra],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            from bench import celery_app

            celery_app.app.conf.broker_url = celery_app.app.conf.result_backend = broker
            self.tasks = celery_app
            deadline = time.monotonic() + 60
            while not celery_app.app.control.ping(timeout=0.5):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("celery worker did not start")
        except BaseException:
            self.stop()
            raise

    # Same shared-memory counters and start logs as the engine's bench worker.
    completed = Worker.completed
    wait_completed = Worker.wait_completed
    runs = Worker.runs

    def stop(self) -> None:
        """Warm shutdown (killed after 30 s), then its files are removed."""
        stop_process(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


def throughput(redis_url: str, tasks: int, concurrency: int) -> dict:
    """Scenario 1 on Celery."""
    return _noops(CeleryWorker(redis_url, concurrency), tasks)


def _noops(worker: CeleryWorker, tasks: int) -> dict:
    """No-op tasks/s through ``worker`` (warmed with one task first), which is stopped after."""
    try:
        worker.tasks.noop.delay(0, 0)
        worker.wait_completed(1, 60)
        return scenarios.time_noops(lambda i: worker.tasks.noop.delay(i, i), worker, tasks)
    finally:
        worker.stop()


def latency(redis_url: str, tasks: int, concurrency: int) -> dict:
    """Scenario 3 on Celery (Redis result backend)."""
    worker = CeleryWorker(redis_url, concurrency)
    try:
        return scenarios.time_round_trips(lambda i: worker.tasks.add.delay(i, 1).get(timeout=30), min(tasks, 500))
    finally:
        worker.stop()


def fairness(redis_url: str, concurrency: int, long_s: float = 2.0, short_s: float = 0.01) -> dict:
    """Scenario 4 on Celery's best mode: ``-O fair`` with prefetch multiplier 1."""
    worker = CeleryWorker(redis_url, concurrency, "-O", "fair", prefetch=1)
    try:
        worker.app = lambda: worker.tasks
        return scenarios._fairness_batch(worker, long_s, short_s)
    finally:
        worker.stop()


def fair(redis_url: str, tasks: int, concurrency: int) -> dict:
    """Scenario 1 on Celery's ``-O fair`` (prefetch multiplier 1), beside ``--fair``."""
    return _noops(CeleryWorker(redis_url, concurrency, "-O", "fair", prefetch=1), tasks)


def chord(redis_url: str, tasks: int, concurrency: int) -> dict:
    """The chord scenario on Celery (Redis results: its chord counter, no ``chord_unlock`` polling)."""
    from celery import chord as celery_chord

    from bench import pipelines

    count = min(tasks, pipelines.CHORD_MAX)
    worker = CeleryWorker(redis_url, concurrency)
    try:
        t = worker.tasks
        return pipelines.time_chord(worker, lambda sent: celery_chord(t.chord_part.s(i, sent) for i in range(count))(
            t.chord_body.s(sent)), t.short_task, count)
    finally:
        worker.stop()
