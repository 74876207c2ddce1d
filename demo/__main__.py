"""Run a demo batch through a real ``engine-worker``, then stop it.

``python -m demo [--tasks N] [--concurrency C]`` starts a worker on a free
loopback port, sends N tasks, reads every result from the SQLite backend,
runs a few chains and retrying tasks, prints what it measured and stops the
worker (warm shutdown).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="engine-demo-"))
    os.environ["DEMO_ENDPOINT"] = free_endpoint()
    os.environ["DEMO_BACKEND"] = f"sqlite:///{workdir / 'results.db'}"
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "-A", "demo.tasks", "--concurrency", str(options.concurrency),
         "--loglevel", "WARNING"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in worker.stderr:
            sys.stderr.write(line)
            if line.startswith("  core:"):
                break
        from demo.tasks import add, fetch, flaky, noop, parse, store

        print(f"demo: {options.tasks} tasks, concurrency {options.concurrency}, endpoint {os.environ['DEMO_ENDPOINT']}")
        started = time.perf_counter()
        for i in range(options.tasks):
            noop.delay(i, i)
        add.delay(0, 0).get(timeout=120)  # sent last: done (to within one task per child) when the batch is
        ignored = time.perf_counter() - started
        print(f"  {options.tasks} no-op tasks, results ignored: {ignored:.2f}s "
              f"({options.tasks / ignored:,.0f} tasks/s, "
              "approximate: timed to the result of one task sent after them; bench/ measures exactly)")

        count = min(options.tasks, 5000)
        started = time.perf_counter()
        results = [add.delay(i, i) for i in range(count)]
        values = [r.get(timeout=120) for r in results]
        stored = time.perf_counter() - started
        assert values == [2 * i for i in range(count)], "wrong results"
        print(f"  {count} add tasks, results stored and fetched: {stored:.2f}s ({count / stored:,.0f} tasks/s)")

        chains = [(fetch.s(n) | parse.s() | store.s(n))() for n in range(5)]
        print(f"  chains fetch -> parse -> store: {[c.get(timeout=60)['digest'] for c in chains]}")
        print(f"  autoretry with backoff: {[flaky.delay(n).get(timeout=60) for n in range(3)]}")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            code = worker.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"worker stopped (exit status {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
