"""The tasks the end-to-end benchmarks run (``engine-worker -A bench.apps``).

Endpoint and backend come from the environment. ``noop`` ignores its result,
so completions are counted in shared memory instead: each thread that runs
tasks bumps an 8-byte counter in its own file under ``BENCH_COUNTER_DIR``
(a fraction of a microsecond, charged to every system alike), and the harness
sums the files.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
import time

from engine import Engine

app = Engine(
    "bench",
    transport=os.environ.get("BENCH_ENDPOINT", "tcp://127.0.0.1:5598"),
    backend=os.environ.get("BENCH_BACKEND") or None,
)

_COUNT = struct.Struct("<q")
#: Per thread: ``view``, its counter (an int64 view of its file; None without BENCH_COUNTER_DIR).
_local = threading.local()
_files = itertools.count()


def _forget_counters() -> None:
    global _local
    _local = threading.local()  # a forked child counts into files of its own


os.register_at_fork(after_in_child=_forget_counters)


def _bump() -> None:
    # One counter file per thread (a peer such as Dramatiq runs tasks in several threads of one
    # process): no lock, one in-place add.
    try:
        view = _local.view
    except AttributeError:
        view = _local.view = _counter_view()
    if view is not None:
        view[0] += 1


def _counter_view() -> memoryview | None:
    """A new counter file of this thread under BENCH_COUNTER_DIR, as a one-item int64 view (None: no directory)."""
    directory = os.environ.get("BENCH_COUNTER_DIR")
    if not directory:
        return None
    path = os.path.join(directory, f"{os.getpid()}-{next(_files)}")
    with open(path, "wb") as fh:
        fh.write(b"\0" * 8)
    with open(path, "r+b") as fh:
        return memoryview(mmap.mmap(fh.fileno(), 8)).cast("q")


def completed(directory: str) -> int:
    """Sum of every child's counter in ``directory``."""
    total = 0
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as fh:
            data = fh.read(8)
        if len(data) == 8:
            total += _COUNT.unpack(data)[0]
    return total


@app.task(ignore_result=True)
def noop(x, y):
    _bump()


@app.task
def add(x, y):
    return x + y


@app.task(ignore_result=True, name="bench.long")
def long_task(seconds, sent):
    _timed("long", seconds, sent)


@app.task(ignore_result=True, name="bench.short")
def short_task(seconds, sent):
    _timed("short", seconds, sent)


def _timed(kind: str, seconds: float, sent: float) -> None:
    """Sleep ``seconds`` and append ``kind sent start end`` to this child's file in BENCH_STARTS_DIR."""
    start = time.time()
    time.sleep(seconds)
    directory = os.environ.get("BENCH_STARTS_DIR")
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}.txt"), "a") as fh:
            fh.write(f"{kind} {sent:.6f} {start:.6f} {time.time():.6f}\n")


@app.task(name="bench.chord_part")
def chord_part(value, sent):
    """A chord's header task: timed like ``short_task``; returns ``value`` for the body."""
    _timed("short", 0.0, sent)
    return value


@app.task(ignore_result=True, name="bench.chord_body")
def chord_body(values, sent):
    """A chord's body: its start is timed against the header tasks' ends (``values``: the header's results)."""
    _timed("body", 0.0, sent)
    if values is not None and values != list(range(len(values))):
        raise AssertionError("the chord body did not get the header's results in order")
