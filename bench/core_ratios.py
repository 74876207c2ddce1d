"""Print how much faster the compiled core is than its pure twin, per function.

``python -m bench.core_ratios`` runs ``bench/test_core_bench.py`` under pytest-benchmark
(in a subprocess, JSON to a temporary file) and prints the median time per call of each
benchmark group for both twins and the ratio python/cython.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(extra_args: list[str]) -> dict:
    """Run the core benchmarks and return the parsed pytest-benchmark JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", "bench/test_core_bench.py", "-p",
               "no:cacheprovider", "-q", "--benchmark-only", f"--benchmark-json={path}",
               "--benchmark-max-time=0.5", "--benchmark-min-rounds=5", *extra_args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not os.path.exists(path):
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(done.returncode or 1)
        with open(path) as f:
            return json.load(f)


def table(data: dict) -> list[tuple[str, float, float]]:
    """``(group, cython median µs, python median µs)`` for each group, in run order."""
    medians: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        impl = bench["param"] or bench["name"].rsplit("[", 1)[-1].rstrip("]")
        medians.setdefault(bench["group"], {})[impl] = bench["stats"]["median"] * 1e6
    return [(group, times.get("cython", float("nan")), times.get("python", float("nan")))
            for group, times in medians.items()]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and print the table; extra arguments go to pytest."""
    rows = table(run(list(sys.argv[1:] if argv is None else argv)))
    width = max(len("group"), *(len(group) for group, _, _ in rows))
    print(f"{'group':<{width}}  {'cython µs':>11}  {'python µs':>11}  {'python/cython':>13}")
    for group, cy, py in rows:
        print(f"{group:<{width}}  {cy:>11.3f}  {py:>11.3f}  {py / cy:>12.1f}x")


if __name__ == "__main__":
    main()
