"""``python -m bench run``: end-to-end benchmarks of the real ``engine-worker``.

Each scenario starts a worker, measures, and stops it; a progress bar shows
while it runs, a table prints at the end, ``--json FILE`` saves the figures.
``python -m bench core`` prints the compiled-vs-pure ratios of the core;
``python -m bench profile`` samples every process of a no-op run with py-spy;
``python -m bench mesh`` measures links and heartbeats as the mesh grows;
``python -m bench store`` what storing a result costs SQLite, by kind of task id;
``python -m bench instructions`` counts instructions per ``delay()`` with callgrind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

from bench import celery_peer, dramatiq_peer, pipelines
from bench.redis_server import RedisServer
from bench.scenarios import SCENARIOS as BASIC_SCENARIOS
from bench.table import print_table

#: Every scenario ``bench run`` knows, in the order a full run takes them.
SCENARIOS = {**BASIC_SCENARIOS, "fair": pipelines.fair, "mixed": pipelines.mixed, "pipeline": pipelines.pipeline,
             "chord": pipelines.chord, "operating": pipelines.operating}


def _progress_bar():
    try:
        from rich.progress import Progress
    except ImportError:
        return None
    return Progress()


def run(options: argparse.Namespace) -> int:
    import engine

    names = options.scenarios or list(SCENARIOS)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "core": engine.IMPLEMENTATION,
              "tasks": options.tasks, "concurrency": options.concurrency, "runs": options.runs}
    bar = _progress_bar()
    if bar is not None:
        bar.start()
    each_run = []
    wanted = {peer: [name for name in scenarios if name in names]
              for peer, (_, scenarios) in PEERS.items() if peer not in options.skip_peers}
    wanted = {peer: scenarios for peer, scenarios in wanted.items() if scenarios}
    missing = {peer: PEERS[peer][0].available() for peer in wanted}
    # One Redis for the peers over all runs (Celery's app keeps its broker connections).
    peer_redis = RedisServer().start() if any(reason is None for reason in missing.values()) else None
    try:
        for number in range(1, options.runs + 1):
            one = {"results": {}}
            for name in names:
                label = f"{name} ({options.tasks} tasks, concurrency {options.concurrency})"
                if options.runs > 1:
                    label = f"run {number}/{options.runs}: {label}"
                if bar is not None:
                    handle = bar.add_task(label, total=1.0)
                    progress = functools.partial(_show_progress, bar, handle)
                else:
                    print(label, file=sys.stderr)
                    progress = _no_progress
                one["results"][name] = SCENARIOS[name](options.tasks, options.concurrency, progress)
            for peer, scenarios in wanted.items():
                if missing[peer]:
                    one[peer] = {"skipped": missing[peer]}
                else:
                    one[peer] = _run_peer(peer, options, scenarios, one["results"], bar, peer_redis.url)
            each_run.append(one)
    finally:
        if bar is not None:
            bar.stop()
        if peer_redis is not None:
            peer_redis.stop()
    report.update(median_of_runs(each_run))
    if options.runs > 1:
        report["each_run"] = each_run
    print_table(report)
    if options.json:
        with open(options.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def median_of_runs(reports: list) -> dict:
    """One report whose every number is the median of that number over ``reports`` (same shape)."""
    first = reports[0]
    if isinstance(first, dict):
        return {key: median_of_runs([r[key] for r in reports if isinstance(r, dict) and key in r])
                for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        value = statistics.median(reports)
        return round(value, 3) if isinstance(value, float) else value
    return first  # text, lists (per-child figures): the first run's


#: The peers compared in the same run: module, and the scenarios each runs.
PEERS = {
    "celery": (celery_peer, ("throughput", "latency", "fairness", "fair", "chord")),
    "dramatiq": (dramatiq_peer, ("throughput", "latency")),
}


def _run_peer(peer: str, options: argparse.Namespace, wanted: list[str], ours: dict, bar, redis_url: str) -> dict:
    """The ``wanted`` scenarios on ``peer`` (broker and results in the Redis at ``redis_url``), with ratios."""
    module = PEERS[peer][0]
    handle = bar.add_task(f"{peer} (+ redis)", total=len(wanted)) if bar is not None else None
    out: dict = {}
    if "throughput" in wanted:
        tasks = min(options.tasks, options.peer_tasks)
        out["throughput"] = module.throughput(redis_url, tasks, options.concurrency)
        out["throughput"]["engine_ratio"] = round(ours["throughput"]["tasks_per_s"]
                                                  / out["throughput"]["tasks_per_s"], 1)
        _advance(bar, handle)
    if "latency" in wanted:
        out["latency"] = module.latency(redis_url, options.tasks, options.concurrency)
        for backend in ("rpc", "redis"):
            if "p50_ms" in ours["latency"].get(backend, {}):
                out["latency"][f"engine_{backend}_p50_ratio"] = round(
                    out["latency"]["p50_ms"] / ours["latency"][backend]["p50_ms"], 1)
        _advance(bar, handle)
    if "fairness" in wanted:
        out["fairness"] = module.fairness(redis_url, options.concurrency)
        _advance(bar, handle)
    if "fair" in wanted:  # its -O fair throughput, at the run's concurrency
        out["fair"] = module.fair(redis_url, min(options.tasks, options.peer_tasks), options.concurrency)
        _advance(bar, handle)
    if "chord" in wanted:
        out["chord"] = module.chord(redis_url, options.tasks, options.concurrency)
        _advance(bar, handle)
    return out


def _advance(bar, handle) -> None:
    if bar is not None:
        bar.advance(handle)


def _show_progress(bar, handle, fraction: float) -> None:
    """A scenario's progress callback when a bar is shown: ``fraction`` done of its row."""
    bar.update(handle, completed=fraction)


def _no_progress(fraction: float) -> None:
    """A scenario's progress callback without a bar (no ``rich``): the label was printed instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="end-to-end scenarios against a real worker")
    run_parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO",
                            help=f"any of: {', '.join(SCENARIOS)} (default: all)")
    run_parser.add_argument("--tasks", type=int, default=100_000)
    run_parser.add_argument("--concurrency", type=int, default=2)
    run_parser.add_argument("--runs", type=int, default=1,
                            help="run everything this many times and report medians (the README's figures: 3)")
    run_parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    run_parser.add_argument("--no-celery", dest="skip_peers", action="append_const", const="celery", default=[],
                            help="skip the Celery comparison")
    run_parser.add_argument("--no-dramatiq", dest="skip_peers", action="append_const", const="dramatiq",
                            help="skip the Dramatiq comparison")
    run_parser.add_argument("--peer-tasks", "--celery-tasks", dest="peer_tasks", type=int, default=5000,
                            help="most no-op tasks sent to Celery and to Dramatiq (they are slow; default 5000)")
    sub.add_parser("core", help="compiled vs pure core micro-benchmarks")
    sub.add_parser("profile", help="where a no-op task's time goes, per process (py-spy)", add_help=False)
    sub.add_parser("mesh", help="links, heartbeat frames and memory per host as the mesh grows", add_help=False)
    sub.add_parser("store", help="the SQLite backend's cost per stored result, by kind of task id", add_help=False)
    sub.add_parser("instructions", help="instructions per delay() and group member, by callgrind", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["mesh"]:  # links, heartbeats and memory per host as the mesh grows (bench/mesh.py)
        return __import__("bench.mesh", fromlist=["main"]).main(argv[1:])
    if argv[:1] == ["store"]:  # the SQLite backend's cost per stored result, by kind of task id
        return __import__("bench.store", fromlist=["main"]).main(argv[1:])
    if argv[:1] == ["instructions"]:  # instructions per delay() and group member (callgrind)
        return __import__("bench.instructions", fromlist=["main"]).main(argv[1:])
    if argv[:1] == ["profile"]:
        from bench.profile import main as profile_main

        return profile_main(argv[1:])
    options = parser.parse_args(argv)
    if options.command == "core":
        from bench.core_ratios import main as core_main

        return core_main([]) or 0
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
