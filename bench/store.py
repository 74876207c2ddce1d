"""``python -m bench store``: what storing a result costs the SQLite backend, by kind of task id.

A worker stores its children's results in batches (``StateFlusher``, one
transaction per batch). The results table is keyed by task id, so where a new
id lands in the key's B-tree decides how many pages a batch rewrites: random
ids (version 4 UUIDs, Celery's) put each row of a batch on a page of its own,
time-ordered ids (version 7, the engine's) put a batch on the last few pages.
This prints microseconds per stored row for both, in the same run, as the
table grows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from engine import Engine, states
from engine.core import StateRecord, new_task_id
from engine.serialization import dumps
from engine.worker.state_flusher import BATCH_SIZE

__all__ = ("main", "store_cost")

#: Kinds of task id compared: name -> a function making one.
ID_KINDS = {"uuid7 (engine)": new_task_id, "uuid4 (random)": lambda: str(uuid.uuid4())}


def store_cost(rows: int, make_id, batch: int = BATCH_SIZE) -> float:
    """Microseconds per row to store ``rows`` SUCCESS results into a new SQLite file, ``batch`` per transaction."""
    with tempfile.TemporaryDirectory(prefix="engine-store-") as tmp:
        app = Engine("store", backend=f"sqlite:///{Path(tmp) / 'results.db'}", set_as_current=False)
        backend = app.backend
        result = dumps(12345)
        batches = [[StateRecord(make_id(), states.SUCCESS, result, None, time.time()) for _ in range(batch)]
                   for _ in range(max(1, rows // batch))]
        started = time.perf_counter()
        for records in batches:
            backend.store(records)
        elapsed = time.perf_counter() - started
        app.close()
    return elapsed / (len(batches) * batch) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="results stored per run (default 100,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per kind of id, alternated; medians shown")
    options = parser.parse_args(argv)
    found: dict[str, list[float]] = {kind: [] for kind in ID_KINDS}
    for _ in range(options.runs):
        for kind, make_id in ID_KINDS.items():  # alternated: the machine's drift hits both alike
            found[kind].append(store_cost(options.rows, make_id))
    medians = {kind: statistics.median(values) for kind, values in found.items()}
    print(f"SQLite backend, {options.rows:,} results in batches of {BATCH_SIZE}, medians of {options.runs} runs:")
    for kind, value in medians.items():
        print(f"  {kind:16s} {value:6.2f} µs per stored row   (runs: {', '.join(f'{v:.2f}' for v in found[kind])})")
    first, second = medians.values()
    print(f"  random ids cost {second / first:.2f}x what time-ordered ids cost")
    return 0
