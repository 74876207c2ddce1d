"""Scenarios of batch pipelines under ``--fair``: its throughput, a mixed workload, a group with results.

``--fair`` is the command our users run, so each figure is measured in both
modes in the same run: ``--fair`` (the default) and ``--no-fair`` (FIFO with prefetch).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import psutil

from bench import redis_server
from bench.harness import Worker, cpu_seconds
from bench.scenarios import _backend_url, _percentile, throughput

__all__ = ("chord", "fair", "mixed", "operating", "pipeline")

#: Concurrency levels of the fair scenario besides the run's own (many children on few cores).
MANY_CHILDREN = 16
#: The mixed workload: tiny tasks, and one task of this many seconds per MIXED_EVERY tiny ones.
MIXED_SLOW_SECONDS = 0.05
MIXED_EVERY = 100
#: Largest group of the pipeline scenario (the issue's 20,000).
PIPELINE_MAX = 20_000
#: Largest chord header of the chord scenario (the issue's 10,000).
CHORD_MAX = 10_000
#: The two scheduling modes and their flags (``--fair`` is the default mode).
MODES = (("fifo", ("--no-fair",)), ("fair", ("--fair",)))


def fair(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """No-op tasks/s, results ignored, FIFO (``--no-fair``) and ``--fair``, at ``concurrency`` and 16 children."""
    levels = sorted({concurrency, MANY_CHILDREN})
    out: dict = {}
    steps = len(levels) * len(MODES)
    for index, (level, (mode, flags)) in enumerate((lv, m) for lv in levels for m in MODES):
        out.setdefault(str(level), {})[mode] = throughput(tasks, level, lambda _: None, extra=flags)["tasks_per_s"]
        progress((index + 1) / steps)
    for level in out.values():
        level["fair_vs_fifo"] = round(level["fair"] / level["fifo"], 3)
    return out


def mixed(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """Tiny tasks with a 50 ms task every 100, sent in one burst: throughput and the tiny tasks' wait.

    The wait of a task is from its ``delay()`` to the start of its body; the
    throughput is tasks over the makespan (first send to last end). Each mode
    first runs one task of each kind (a worker that knows its kinds).
    """
    count = max(MIXED_EVERY, min(tasks, 20_000))
    out = {}
    for index, (mode, flags) in enumerate(MODES):
        with Worker(concurrency, *flags) as worker:
            apps = worker.app()
            apps.short_task.delay(0.0, time.time())
            apps.long_task.delay(MIXED_SLOW_SECONDS, time.time())
            _wait_runs(worker, 2, 0.0)
            sent0 = round(time.time(), 6)  # as the tasks write it: rows are compared with it
            slow = 0
            for i in range(count):
                if i % MIXED_EVERY == MIXED_EVERY // 2:
                    apps.long_task.delay(MIXED_SLOW_SECONDS, time.time())
                    slow += 1
                else:
                    apps.short_task.delay(0.0, time.time())
            rows = _wait_runs(worker, count, sent0)
        tiny = [(start - sent) * 1000 for kind, sent, start, _ in rows if kind == "short"]
        makespan = max(end for *_, end in rows) - sent0
        out[mode] = {"tasks": count, "slow_tasks": slow, "tasks_per_s": round(count / makespan),
                     "tiny_wait_p50_ms": round(statistics.median(tiny), 2),
                     "tiny_wait_p99_ms": round(_percentile(tiny, 0.99), 2), "makespan_s": round(makespan, 3)}
        progress((index + 1) / len(MODES))
    out["fair_vs_fifo"] = round(out["fair"]["tasks_per_s"] / out["fifo"]["tasks_per_s"], 3)
    return out


def _wait_runs(worker: Worker, count: int, since: float, timeout: float = 600) -> list:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in worker.runs() if r[1] >= since]
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(rows)} of {count} timed tasks ran in {timeout}s")
        time.sleep(0.02)


def pipeline(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """``group(add.s(i, i) for i in range(N)).apply_async().get()``: N tasks/s, per result backend and mode.

    Backends: sqlite, rpc, and redis when a ``redis-server`` can be started here.
    """
    from engine import group

    count = min(tasks, PIPELINE_MAX)
    out: dict = {}
    steps = [(backend, mode, flags) for backend in ("sqlite", "rpc", "redis") for mode, flags in MODES]
    for index, (backend, mode, flags) in enumerate(steps):
        with _backend_url(backend) as url:
            if url is None:
                out[backend] = {"skipped": redis_server.missing()}
                continue
            with Worker(concurrency, *flags, backend=url) as worker:
                apps = worker.app()
                apps.add.delay(0, 0).get(timeout=30)
                client = psutil.Process()
                client0, (supervisor0, children0) = cpu_seconds(client), worker.cpu_seconds()
                started = time.perf_counter()
                values = group(apps.add.s(i, i) for i in range(count)).apply_async().get(timeout=600)
                elapsed = time.perf_counter() - started
                client1, (supervisor1, children1) = cpu_seconds(client), worker.cpu_seconds()
                if values != [2 * i for i in range(count)]:
                    raise AssertionError("the group's results are not its tasks' results, in order")
        per_task = 1e6 / count
        out.setdefault(backend, {})[mode] = {
            "tasks": count, "seconds": round(elapsed, 4), "tasks_per_s": round(count / elapsed),
            # The client's figure includes its result reads; a Redis server's CPU is in none of them.
            "cpu_us_per_task": {"client": round((client1 - client0) * per_task, 2),
                                "supervisor": round((supervisor1 - supervisor0) * per_task, 2),
                                "children": round((children1 - children0) * per_task, 2)}}
        progress((index + 1) / len(steps))
    return out


def chord(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """A chord of N timed header tasks (each returns a number) and a timed body given their results, sqlite.

    Figures: header tasks per second (first send to body start) and the body's
    start after the last header task's end. Celery's chord runs beside it
    (``bench.celery_peer.chord``, Redis results).
    """
    from engine import chord as make_chord

    count = min(tasks, CHORD_MAX)
    with Worker(concurrency, backend="sqlite") as worker:
        apps = worker.app()
        out = time_chord(worker, lambda sent: make_chord(apps.chord_part.s(i, sent) for i in range(count))(
            apps.chord_body.s(sent)), apps.short_task, count)
    progress(1.0)
    return out


def time_chord(worker: Any, send: Callable[[float], Any], warm_task: Any, count: int) -> dict:
    """Send a chord of ``count`` header tasks with ``send(sent0)`` to ``worker`` (engine or Celery) and time it."""
    warm_task.delay(0.0, time.time())
    _wait_runs(worker, 1, 0.0)
    # Rounded as the tasks write it (6 decimals): every row of this chord has exactly this "sent".
    sent0 = round(time.time(), 6)
    send(sent0)
    try:
        rows = _wait_runs(worker, count + 1, sent0, timeout=60 + count / 100)
    except TimeoutError as exc:
        log = getattr(worker, "log", None)
        raise TimeoutError(f"{exc}; the worker said:\n" + "".join(list(log or [])[-30:])) from None
    header_end = max(end for kind, _, _, end in rows if kind == "short")
    body_start = max(start for kind, _, start, _ in rows if kind == "body")
    return {"tasks": count, "seconds": round(body_start - sent0, 3), "tasks_per_s": round(count / (body_start - sent0)),
            "body_delay_ms": round((body_start - header_end) * 1000, 2)}


#: The operator's options the operating scenario prices, beside a worker without them.
OPERATING = (("plain", ()), ("events", ("-E",)), ("metrics", ("--metrics-port", "0")),
             ("events+metrics", ("-E", "--metrics-port", "0")))


def operating(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """No-op tasks/s with ``-E`` (events) and ``--metrics-port``, beside the same worker without (same run).

    The metrics server is not scraped here (a scrape reads the supervisor's
    figures once; its cost is per scrape, not per task); events are published
    with nobody subscribed, which costs the worker what a subscriber would.
    """
    out: dict = {}
    for index, (label, flags) in enumerate(OPERATING):
        out[label] = throughput(tasks, concurrency, lambda _: None, extra=flags)["tasks_per_s"]
        progress((index + 1) / len(OPERATING))
    for label, _ in OPERATING[1:]:
        out[f"{label}_vs_plain"] = round(out[label] / out["plain"], 3)
    return out
