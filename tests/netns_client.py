"""The client of the multi-host tests, run inside a lab host (``ip netns exec``): a batch, then a report.

    python3 -m tests.netns_client --transport dns+tcp://workers.test:5555 --backend redis://... \\
        --runs DIR --tasks N --seconds S --out REPORT.json

Sends N ``workerapp.mark_host`` tasks to the workers the name resolves to
(re-resolved every 0.5 s), or with ``--bind-port P`` binds ``tcp://0.0.0.0:P``
for workers that connect to it (the ventilator pattern), waits for every
result, and writes a JSON report:
how many tasks reached each final state and which numbers never finished.
Executions (and so duplicates) are counted by the test from the runs folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from engine import GroupResult
from tests import workerapp


def main() -> None:
    """Run the batch and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", default=None)
    parser.add_argument("--bind-port", type=int, default=None)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    app = workerapp.app
    binding = args.bind_port is not None
    app.conf.update(transport=f"tcp://0.0.0.0:{args.bind_port}" if binding else args.transport,
                    result_backend=args.backend, transport_bind=binding, transport_dns_refresh=0.5,
                    producer_flush_timeout=args.timeout)
    started = time.monotonic()
    results = GroupResult([workerapp.mark_host.delay(args.runs, number, args.seconds) for number in range(args.tasks)])
    deadline = started + args.timeout
    while not results.ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    states = collections.Counter(result.state for result in results)
    missing = [number for number, result in enumerate(results) if not result.ready()]
    report = {"sent": args.tasks, "states": dict(states), "missing": missing,
              "elapsed": round(time.monotonic() - started, 3)}
    with open(args.out, "w") as fh:
        json.dump(report, fh)
    app.close()


if __name__ == "__main__":
    main()
