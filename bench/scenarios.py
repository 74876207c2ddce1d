"""The end-to-end scenarios: each starts a real worker, measures, and stops it."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Callable

import psutil

from bench import redis_server
from bench.clients import LATE_TIMEOUT, READY_TIMEOUT, Fleet, load_seconds
from bench.harness import Worker, cpu_seconds

__all__ = ("BACKENDS", "SCENARIOS")

#: The result backends scenario 2 measures (redis only when a redis-server can be started).
BACKENDS = ("sqlite", "rpc", "redis")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def time_round_trips(round_trip: Callable[[int], object], count: int, warmup: int = 20,
                     progress: Callable[[float], None] = lambda fraction: None) -> dict:
    """Call ``round_trip(i)`` ``warmup`` times, then ``count`` timed times: p50 / p99 / max in ms.

    Shared by the engine's latency scenario and the peers', so all are measured alike.
    """
    for i in range(warmup):
        round_trip(i)
    samples = []
    for i in range(count):
        started = time.perf_counter()
        round_trip(i)
        samples.append((time.perf_counter() - started) * 1000)
        if i % 100 == 0:
            progress(i / count)
    return {"tasks": count, "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(_percentile(samples, 0.99), 3), "max_ms": round(max(samples), 3)}


def time_noops(send: Callable[[int], object], worker, tasks: int, timeout: float = 1800) -> dict:
    """Call ``send(i)`` ``tasks`` times, then wait for ``worker`` to count them done: tasks/s.

    For the peers (the engine's own scenario also reads CPU times in between);
    ``worker`` has completed exactly one no-op task before.
    """
    started = time.perf_counter()
    for i in range(tasks):
        send(i)
    elapsed = worker.wait_completed(tasks + 1, timeout) - started
    return {"tasks": tasks, "seconds": round(elapsed, 4), "tasks_per_s": round(tasks / elapsed)}


def throughput(tasks: int, concurrency: int, progress: Callable[[float], None], extra: tuple = (),
               started_worker: Callable[[Worker], None] | None = None) -> dict:
    """N no-op tasks, results ignored: first send to last completion.

    Also where the CPU went, in microseconds per task: the client (``delay()``
    and its I/O thread, until every message was acknowledged), the supervisor
    and the children. It tells which process is the limit. ``started_worker``
    is called with the worker once it runs (``python -m bench profile``
    attaches its sampler there).
    """
    with Worker(concurrency, *extra) as worker:
        if started_worker is not None:
            started_worker(worker)
        apps = worker.app()
        apps.noop.delay(0, 0)
        worker.wait_completed(1, 30)  # warm: connected, children forked
        client = psutil.Process()
        client0, (supervisor0, children0) = cpu_seconds(client), worker.cpu_seconds()
        started = time.perf_counter()
        for i in range(tasks):
            apps.noop.delay(i, i)
            if i % 5000 == 0:
                progress(i / tasks)
        apps.app.producer.flush(600)  # sleeps on a condition: no CPU of its own
        client1 = cpu_seconds(client)  # before the harness starts polling for completion
        finished = worker.wait_completed(tasks + 1)
        supervisor1, children1 = worker.cpu_seconds()
        progress(1.0)
    elapsed = finished - started
    per_task = 1e6 / max(tasks, 1)
    return {"tasks": tasks, "seconds": round(elapsed, 4), "tasks_per_s": round(tasks / elapsed),
            "cpu_us_per_task": {"client": round((client1 - client0) * per_task, 2),
                                "supervisor": round((supervisor1 - supervisor0) * per_task, 2),
                                "children": round((children1 - children0) * per_task, 2)}}


def _results(backend: str, tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    with Worker(concurrency, backend=backend) as worker:
        apps = worker.app()
        apps.add.delay(0, 0).get(timeout=30)
        started = time.perf_counter()
        results = [apps.add.delay(i, i) for i in range(tasks)]
        progress(0.5)
        for result in results:
            result.get(timeout=300)
        elapsed = time.perf_counter() - started
        progress(1.0)
    return {"tasks": tasks, "seconds": round(elapsed, 4), "tasks_per_s": round(tasks / elapsed)}


@contextlib.contextmanager
def _backend_url(name: str) -> Iterator[str | None]:
    """The worker's ``backend`` argument for ``name``; for redis a server started here (None without one)."""
    if name != "redis":
        yield name
    elif redis_server.missing():
        yield None
    else:
        with redis_server.RedisServer() as server:
            yield server.url


def results(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """N add tasks with results stored and fetched, per backend (sqlite, rpc, redis)."""
    out = {}
    for index, backend in enumerate(BACKENDS):
        with _backend_url(backend) as url:
            if url is None:
                out[backend] = {"skipped": redis_server.missing()}
                continue
            out[backend] = _results(url, tasks, concurrency, lambda f, i=index: progress((i + f) / len(BACKENDS)))
    return out


def latency(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """One task at a time: send to ``get()``, p50 / p99 / max, per backend (rpc, sqlite, redis)."""
    out = {}
    count = min(tasks, 1000)
    for index, backend in enumerate(("rpc", "sqlite", "redis")):
        with _backend_url(backend) as url:
            if url is None:
                out[backend] = {"skipped": redis_server.missing()}
                continue
            with Worker(concurrency, backend=url) as worker:
                apps = worker.app()
                out[backend] = time_round_trips(lambda i, apps=apps: apps.add.delay(i, 1).get(timeout=30), count,
                                                progress=lambda f, index=index: progress((index + f) / 3))
    progress(1.0)
    return out


def _fairness_batch(worker: Worker, long_s: float, short_s: float) -> dict:
    apps = worker.app()
    pattern = ["L"] + ["S"] * 13 + ["L"] + ["S"] * 13 + ["L"] + ["S"] * 12 + ["L"] + ["S"] * 12
    sent0 = time.time()
    for kind in pattern:
        if kind == "L":
            apps.long_task.delay(long_s, time.time())
        else:
            apps.short_task.delay(short_s, time.time())
    deadline = time.monotonic() + 120
    while len([r for r in worker.runs() if r[1] >= sent0]) < len(pattern):
        if time.monotonic() > deadline:
            raise TimeoutError("fairness batch did not finish")
        time.sleep(0.02)
    rows = [r for r in worker.runs() if r[1] >= sent0]
    waits = [start - sent for kind, sent, start, end in rows if kind == "short"]
    makespan = max(end for *_, end in rows) - min(sent for _, sent, _, _ in rows)
    return {"short_wait_p50_s": round(statistics.median(waits), 3),
            "short_wait_p99_s": round(_percentile(waits, 0.99), 3),
            "short_wait_max_s": round(max(waits), 3), "makespan_s": round(makespan, 3)}


def fairness(tasks: int, concurrency: int, progress: Callable[[float], None], long_s: float = 2.0,
             short_s: float = 0.01) -> dict:
    """4 long tasks and 50 short ones, L S*13 L S*13 L S*12 L S*12, on four workers.

    ``fifo``: the default mode. ``fair_cold``: ``--fair`` on a worker that has
    never run either kind. ``fair_warm``: ``--fair`` on a worker that ran each
    kind once just before (a long-lived worker). ``fair_restarted``: that warm
    worker stopped and started again (it loads the run times from its journal).
    """
    out = {}
    steps = (("fifo", ("--no-fair",), "cold"), ("fair_cold", ("--fair",), "cold"), ("fair_warm", ("--fair",), "warm"),
             ("fair_restarted", ("--fair",), "restarted"))
    for step, (label, flags, history) in enumerate(steps):
        with Worker(concurrency, *flags) as worker:
            if history != "cold":
                apps = worker.app()
                apps.long_task.delay(min(long_s, 0.3), time.time())
                apps.short_task.delay(short_s, time.time())
                deadline = time.monotonic() + 60
                while len(worker.runs()) < 2:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the warm-up tasks did not finish")
                    time.sleep(0.01)
            if history == "restarted":
                worker.restart()
            out[label] = _fairness_batch(worker, long_s, short_s)
        progress((step + 1) / len(steps))
    return out


def scaling(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """No-op throughput at concurrency 1, 2, 4 ... up to the CPU count."""
    out = {}
    levels = [1]
    while levels[-1] * 2 <= (os.cpu_count() or 1):
        levels.append(levels[-1] * 2)
    for index, level in enumerate(levels):
        out[str(level)] = throughput(tasks, level, lambda _: None)["tasks_per_s"]
        progress((index + 1) / len(levels))
    return {"tasks_per_s_by_concurrency": out}


def memory(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """Supervisor and child RSS before N no-op tasks, after them, and after N more.

    The first N include warming up (allocator arenas, socket and pipe
    buffers); growth over the second N is what a leak would show.
    """
    mib = 1024 * 1024
    with Worker(concurrency) as worker:
        apps = worker.app()
        apps.noop.delay(0, 0)
        worker.wait_completed(1, 30)
        before, children_before = worker.rss()
        after = []
        for batch in range(2):
            for i in range(tasks):
                apps.noop.delay(i, i)
                if i % 10000 == 0:
                    progress((batch + i / tasks) / 2)
            worker.wait_completed((batch + 1) * tasks + 1)
            time.sleep(0.2)
            after.append(worker.rss())
    progress(1.0)
    return {"tasks": tasks, "supervisor_rss_mib_before": round(before / mib, 1),
            "supervisor_rss_mib_after": round(after[0][0] / mib, 1),
            "supervisor_rss_mib_after_twice": round(after[1][0] / mib, 1),
            "child_rss_mib_before": [round(x / mib, 1) for x in children_before],
            "child_rss_mib_after": [round(x / mib, 1) for x in after[0][1]],
            "child_rss_mib_after_twice": [round(x / mib, 1) for x in after[1][1]]}


def journal(tasks: int, concurrency: int, progress: Callable[[float], None]) -> dict:
    """What the worker's journal costs: no-op throughput with it (the default) and with --no-journal."""
    on = throughput(tasks, concurrency, lambda f: progress(f / 2))["tasks_per_s"]
    off = throughput(tasks, concurrency, lambda f: progress(0.5 + f / 2), ("--no-journal",))["tasks_per_s"]
    return {"with_journal_tasks_per_s": on, "without_journal_tasks_per_s": off,
            "journal_cost_percent": round(100 * (off - on) / off, 1)}


#: Connected clients per row of the clients scenario.
CLIENT_COUNTS = (1, 10, 100)
#: Active clients in a row of more than one client (the rest are idle; a row of one has one active).
ACTIVE_CLIENTS = 3
#: Round trips the late client times in each row (fewer when the active clients finish first).
LATE_SAMPLES = 200
#: Seconds the idle clients sit idle before the load starts: longer than a worker counts a client as
#: active (engine.transport.consumer.ACTIVE_SECONDS, 1 s), so they are idle, not just done.
IDLE_BEFORE_LOAD = 2.0


def clients(tasks: int, concurrency: int, progress: Callable[[float], None], counts: tuple = CLIENT_COUNTS,
            samples: int = LATE_SAMPLES) -> dict:
    """N connected client processes, most idle, a few active, and one that arrives last, for N in ``counts``.

    Per N: the active clients' no-op tasks/s, first send to last completion
    (each sends ``tasks``, as the throughput scenario's one client does, so
    the late client has time for its round trips while they run); and the
    wait of a client that connects after all N, while the active ones run:
    one ``add`` task at a time, ``delay()`` to its result over ``rpc://``
    (p50 / p99 / max, and its first task's), or ``starved`` when a result
    took longer than :data:`bench.clients.LATE_TIMEOUT`. Clients whose first
    task (before the load) got no result within
    :data:`bench.clients.FIRST_TIMEOUT` are counted in ``starved_at_start``;
    a load that takes longer than :func:`bench.clients.load_seconds` ends
    there, its tasks not done by then counted in ``unfinished``.
    """
    out = {}
    for index, count in enumerate(counts):
        out[str(count)] = _clients_row(count, tasks, concurrency, samples)
        progress((index + 1) / len(counts))
    return out


def _clients_row(count: int, tasks: int, concurrency: int, samples: int) -> dict:
    active = 1 if count == 1 else min(ACTIVE_CLIENTS, count)
    each = max(1, tasks)
    # The fleet is left first: the clients go before the worker stops.
    with Worker(concurrency, backend="rpc") as worker, Fleet(worker.endpoint, worker.env["BENCH_BACKEND"]) as fleet:
        idle = [fleet.start("idle") for _ in range(count - active)]
        busy = [fleet.start("active", count=each) for _ in range(active)]
        starved_at_start = sum(fleet.receive(idle + busy, "ready", READY_TIMEOUT))
        time.sleep(IDLE_BEFORE_LOAD)
        started = time.perf_counter()
        fleet.go.set()
        late = fleet.start("late", samples=samples)
        total = active * each
        bound = load_seconds(total)
        try:
            fleet.receive(busy, "done", bound)  # on pipes: no CPU taken from the clients while they run
            finished = worker.wait_completed(total, max(1.0, bound - (time.perf_counter() - started)))
        except TimeoutError:  # starved or stuck: the row ends here and says how many were not done
            finished = time.perf_counter()
        done = min(total, worker.completed())
        fleet.load_done.set()
        (figures,) = fleet.receive([late], "done", 2 * LATE_TIMEOUT + 60)
    waits = figures["waits_ms"]
    elapsed = finished - started
    return {"clients": count, "active": active, "idle": count - active, "starved_at_start": starved_at_start,
            "tasks": total, "unfinished": total - done, "seconds": round(elapsed, 4),
            "tasks_per_s": round(done / elapsed),
            "late": {"tasks": len(waits), "p50_ms": round(statistics.median(waits), 3),
                     "p99_ms": round(_percentile(waits, 0.99), 3), "max_ms": round(max(waits), 3),
                     "first_ms": round(waits[0], 3), "starved": figures["starved"], "timeout_s": LATE_TIMEOUT}}


SCENARIOS = {
    "throughput": throughput,
    "results": results,
    "latency": latency,
    "fairness": fairness,
    "scaling": scaling,
    "memory": memory,
    "journal": journal,
    "clients": clients,
}
