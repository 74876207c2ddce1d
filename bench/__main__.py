"""``python -m bench run``: end-to-end benchmarks of the real ``engine-worker``.

Each scenario starts a worker, measures, and stops it; a progress bar shows
while it runs, a table prints at the end, ``--json FILE`` saves the figures.
``python -m bench core`` prints the compiled-vs-pure ratios of the core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from bench.scenarios import SCENARIOS
from bench.table import print_table


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
              "tasks": options.tasks, "concurrency": options.concurrency, "results": {}}
    bar = _progress_bar()
    if bar is not None:
        bar.start()
    try:
        for name in names:
            label = f"{name} ({options.tasks} tasks, concurrency {options.concurrency})"
            if bar is not None:
                handle = bar.add_task(label, total=1.0)
                progress = lambda fraction, handle=handle: bar.update(handle, completed=fraction)
            else:
                print(label, file=sys.stderr)
                progress = lambda fraction: None
            report["results"][name] = SCENARIOS[name](options.tasks, options.concurrency, progress)
        if not options.no_celery:
            report["celery"] = _run_celery(options, names, report, bar)
    finally:
        if bar is not None:
            bar.stop()
    print_table(report)
    if options.json:
        with open(options.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def _run_celery(options: argparse.Namespace, names: list[str], report: dict, bar) -> dict:
    """Scenarios 1, 3 and 4 on Celery in the same run, with engine/Celery ratios."""
    from bench import celery_peer
    from bench.redis_server import RedisServer

    why_not = celery_peer.available()
    if why_not:
        return {"skipped": why_not}
    wanted = [name for name in ("throughput", "latency", "fairness") if name in names]
    if not wanted:
        return {}
    handle = bar.add_task("celery (prefork + redis)", total=len(wanted)) if bar is not None else None
    redis = RedisServer().start()
    out: dict = {}
    try:
        ours = report["results"]
        if "throughput" in wanted:
            tasks = min(options.tasks, options.celery_tasks)
            out["throughput"] = celery_peer.throughput(redis.url, tasks, options.concurrency)
            out["throughput"]["engine_ratio"] = round(ours["throughput"]["tasks_per_s"]
                                                      / out["throughput"]["tasks_per_s"], 1)
            _advance(bar, handle)
        if "latency" in wanted:
            out["latency"] = celery_peer.latency(redis.url, options.tasks, options.concurrency)
            out["latency"]["engine_rpc_p50_ratio"] = round(out["latency"]["p50_ms"] / ours["latency"]["rpc"]["p50_ms"], 1)
            _advance(bar, handle)
        if "fairness" in wanted:
            out["fairness"] = celery_peer.fairness(redis.url, options.concurrency)
            _advance(bar, handle)
    finally:
        redis.stop()
    return out


def _advance(bar, handle) -> None:
    if bar is not None:
        bar.advance(handle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="end-to-end scenarios against a real worker")
    run_parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO",
                            help=f"any of: {', '.join(SCENARIOS)} (default: all)")
    run_parser.add_argument("--tasks", type=int, default=100_000)
    run_parser.add_argument("--concurrency", type=int, default=2)
    run_parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    run_parser.add_argument("--no-celery", action="store_true", help="skip the Celery comparison")
    run_parser.add_argument("--celery-tasks", type=int, default=5000,
                            help="most no-op tasks sent to Celery (it is slow; default 5000)")
    sub.add_parser("core", help="compiled vs pure core micro-benchmarks")
    options = parser.parse_args(argv)
    if options.command == "core":
        from bench.core_ratios import main as core_main

        return core_main([]) or 0
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
