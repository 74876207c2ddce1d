"""The table ``python -m bench run`` prints at the end: one row per figure, Celery and Dramatiq beside it."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ("print_table", "rows")

Row = tuple[str, str, str, str, str, str]


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.1f}x" if ours and theirs else ""


def _latency(figures: dict) -> str:
    return f"{figures['p50_ms']}/{figures['p99_ms']}/{figures['max_ms']} ms"


def _wait(figures: dict) -> str:
    return f"{figures['short_wait_p50_s']}/{figures['short_wait_max_s']} s, {figures['makespan_s']} s"


def _peer_throughput(peer: dict, ours: float) -> tuple[str, str]:
    theirs = peer.get("throughput", {}).get("tasks_per_s", 0)
    return (_n(theirs) if theirs else "", _ratio(ours, theirs))


def _peer_latency(peer: dict, backend: str, ours: dict) -> tuple[str, str]:
    # The peer's figures sit beside the like-for-like row (its redis result backend);
    # the ratio at p50 on every row.
    theirs = peer.get("latency", {})
    if not theirs or "p50_ms" not in ours:
        return ("", "")
    return (_latency(theirs) if backend == "redis" else "", _ratio(theirs["p50_ms"], ours["p50_ms"]) + " at p50")


def rows(report: dict) -> Iterator[Row]:
    """``(figure, engine, Celery, vs Celery, Dramatiq, vs Dramatiq)`` per figure in ``report`` (the ``--json`` dict)."""
    ours = report["results"]
    celery = report.get("celery", {})
    dramatiq = report.get("dramatiq", {})
    if "throughput" in ours:
        rate = ours["throughput"]["tasks_per_s"]
        yield ("no-op tasks/s (results ignored)", _n(rate), *_peer_throughput(celery, rate),
               *_peer_throughput(dramatiq, rate))
        cpu = ours["throughput"].get("cpu_us_per_task")
        if cpu:
            yield ("CPU µs per no-op task: client / supervisor / children",
                   " / ".join(str(cpu[part]) for part in ("client", "supervisor", "children")), "", "", "", "")
    for backend, figures in ours.get("results", {}).items():
        yield (f"tasks/s, results stored+fetched: {backend}",
               figures.get("skipped") or _n(figures["tasks_per_s"]), "", "", "", "")
    for backend, figures in ours.get("latency", {}).items():
        yield (f"round trip p50/p99/max: {backend}", figures.get("skipped") or _latency(figures),
               *_peer_latency(celery, backend, figures), *_peer_latency(dramatiq, backend, figures))
    theirs = celery.get("fairness")
    for label, figures in ours.get("fairness", {}).items():
        fair = label.startswith("fair")
        yield (f"4L+50S short wait p50/max, makespan: {label}", _wait(figures),
               _wait(theirs) + " (-O fair)" if theirs and label == "fair_cold" else "",
               _ratio(theirs["short_wait_max_s"], figures["short_wait_max_s"]) + " at max" if theirs and fair else "",
               "", "")
    if "scaling" in ours:
        by_level = ours["scaling"]["tasks_per_s_by_concurrency"]
        yield ("no-op tasks/s at concurrency " + "/".join(by_level), " / ".join(_n(v) for v in by_level.values()),
               "", "", "", "")
    if "memory" in ours:
        m = ours["memory"]
        yield (f"supervisor RSS at 0 / {m['tasks']:,} / {2 * m['tasks']:,} tasks",
               f"{m['supervisor_rss_mib_before']} / {m['supervisor_rss_mib_after']} / "
               f"{m['supervisor_rss_mib_after_twice']} MiB", "", "", "", "")
        yield (f"child RSS after {2 * m['tasks']:,} tasks (each)",
               ", ".join(f"{x} MiB" for x in m["child_rss_mib_after_twice"]), "", "", "", "")
    if "journal" in ours:
        j = ours["journal"]
        yield ("no-op tasks/s, journal / --no-journal",
               f"{_n(j['with_journal_tasks_per_s'])} / {_n(j['without_journal_tasks_per_s'])} "
               f"(-{j['journal_cost_percent']}%)", "", "", "", "")
    for size, row in ours.get("clients", {}).items():
        # Engine only: the peers' clients hold no credit to starve (a broker queues for them).
        late = row["late"]
        rate = _n(row["tasks_per_s"])
        if row.get("starved_at_start"):
            rate += f" ({row['starved_at_start']} of {size} clients' first task starved)"
        if row.get("unfinished"):
            rate += f" ({row['unfinished']:,} of {row['tasks']:,} tasks not done in {row['seconds']:.0f} s)"
        yield (f"{size} client(s), {row['active']} active: no-op tasks/s", rate, "not run", "", "not run", "")
        wait = (f"starved: a result took over {late['timeout_s']:g} s" if late["starved"]
                else f"{_latency(late)}, first {late['first_ms']} ms")
        yield (f"{size} client(s): late client's wait p50/p99/max, rpc", wait, "not run", "", "not run", "")
    celery_fair = celery.get("fair", {}).get("tasks_per_s", 0)
    for level, modes in ours.get("fair", {}).items():
        # Celery's -O fair beside ours at the run's concurrency (the ratio is --fair over -O fair).
        same = celery_fair and str(report.get("concurrency")) == str(level)
        yield (f"no-op tasks/s at concurrency {level}: --no-fair / --fair",
               f"{_n(modes['fifo'])} / {_n(modes['fair'])} ({modes['fair_vs_fifo']:.0%})",
               f"{_n(celery_fair)} (-O fair)" if same else "", _ratio(modes["fair"], celery_fair) if same else "",
               "", "")
    if "mixed" in ours:
        for mode in ("fifo", "fair"):
            m = ours["mixed"][mode]
            yield (f"mixed (tiny + 50 ms every {m['tasks'] // max(m['slow_tasks'], 1)}): tasks/s, tiny wait "
                   f"p50/p99: {mode}", f"{_n(m['tasks_per_s'])}, {m['tiny_wait_p50_ms']}/{m['tiny_wait_p99_ms']} ms",
                   "", "", "", "")
    for backend, modes in ours.get("pipeline", {}).items():
        if "skipped" in modes:
            yield (f"group, results fetched, {backend}", modes["skipped"], "", "", "", "")
            continue
        yield (f"group of {modes['fair']['tasks']:,} add, results fetched, {backend}: --no-fair / --fair",
               f"{_n(modes['fifo']['tasks_per_s'])} / {_n(modes['fair']['tasks_per_s'])} tasks/s", "", "", "", "")
        cpu = modes["fair"].get("cpu_us_per_task")
        if cpu:
            yield (f"CPU µs per group member, {backend}, --fair: client / supervisor / children",
                   " / ".join(str(cpu[part]) for part in ("client", "supervisor", "children")), "", "", "", "")
    if "chord" in ours:
        c = ours["chord"]
        theirs = celery.get("chord")
        yield (f"chord of {c['tasks']:,} header tasks (sqlite; Celery: Redis): tasks/s; body start after the "
               "last header end", f"{_n(c['tasks_per_s'])}; {c['body_delay_ms']} ms",
               f"{_n(theirs['tasks_per_s'])}; {theirs['body_delay_ms']} ms" if theirs else "",
               _ratio(c["tasks_per_s"], theirs["tasks_per_s"]) if theirs else "", "", "")
    if "operating" in ours:
        o = ours["operating"]
        yield ("no-op tasks/s: plain / -E / --metrics-port / both",
               f"{_n(o['plain'])} / {_n(o['events'])} ({o['events_vs_plain']:.0%}) / {_n(o['metrics'])} "
               f"({o['metrics_vs_plain']:.0%}) / {_n(o['events+metrics'])} ({o['events+metrics_vs_plain']:.0%})",
               "", "", "", "")
    for name, peer in (("Celery", celery), ("Dramatiq", dramatiq)):
        if "skipped" in peer:
            yield (f"{name} comparison", f"skipped: {peer['skipped']}", "", "", "", "")


def print_table(report: dict) -> None:
    """Print :func:`rows` as a rich table (plain text when rich is not installed)."""
    title = (f"engine ({report['core']} core) | {report['machine']} | {report['date']} | "
             f"--tasks {report['tasks']} --concurrency {report['concurrency']}")
    if report.get("runs", 1) > 1:
        title += f" | medians of {report['runs']} runs"
    headers = ("figure", "engine", "Celery prefork + Redis", "vs Celery", "Dramatiq + Redis", "vs Dramatiq")
    table_rows = list(rows(report))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in (headers, *table_rows):
            print(" | ".join(row))
        return
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in table_rows:
        table.add_row(*row)
    # A pipe or file gets a wide table rather than rich's 80 columns.
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)
    console.print(table)
