"""``engine events`` (a live terminal view, or ``--dump``) and ``engine dashboard`` (the same view in a browser).

Both listen to the events workers publish with ``engine-worker -E`` (see
:mod:`engine.events`) and fold them into a :class:`~engine.events.ClusterState`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import click

from engine.events import ClusterState, EventReceiver, read_into

__all__ = ("dashboard", "events")

#: Seconds between two redraws of the terminal view.
REFRESH = 0.5


def _receiver(app_spec: str | None, endpoints: tuple[str, ...], events_endpoints: tuple[str, ...]) -> EventReceiver:
    from engine.cli import find_app

    app = find_app(app_spec) if app_spec else None
    if app is None and not endpoints and not events_endpoints:
        raise click.UsageError("say which workers: -A APP, --endpoint URL or --events-endpoint URL")
    return EventReceiver(app, endpoints, events_endpoints)


def _source_options(command: Any) -> Any:
    for option in reversed((
        click.option("-A", "--app", "app_spec", default=None, help="The app whose workers to listen to."),
        click.option("--endpoint", "endpoints", multiple=True,
                     help="A worker's task endpoint (its events are at port + 1; repeatable)."),
        click.option("--events-endpoint", "events_endpoints", multiple=True,
                     help="A worker's events endpoint, as given to engine-worker --events-endpoint (repeatable)."),
    )):
        command = option(command)
    return command


def render(snapshot: dict[str, Any]) -> Any:
    """The terminal view of a :meth:`ClusterState.snapshot` (rich renderables)."""
    from rich.console import Group
    from rich.table import Table

    workers = Table(title="workers", expand=True)
    for column in ("worker", "status", "tasks/s", "busy/children", "waiting", "scheduled", "ended"):
        workers.add_column(column, justify="left" if column in ("worker", "status") else "right")
    for worker in snapshot["workers"]:
        busy = f"{worker['busy']}/{worker['children']}" if worker.get("children") is not None else "-"
        workers.add_row(worker["name"], "[green]online[/]" if worker["online"] else "[red]offline[/]",
                        f"{worker['tasks_per_s']:,.1f}", busy, str(worker.get("waiting") or 0),
                        str(worker.get("scheduled") or 0), f"{worker['ended']:,}")
    kinds = Table(title="tasks", expand=True)
    columns = ("received", "started", "succeeded", "failed", "retried", "revoked")
    for column in ("task", "tasks/s", "wait", *columns):
        kinds.add_column(column, justify="left" if column == "task" else "right")
    for task in snapshot["tasks"]:
        kinds.add_row(task["name"], f"{task['tasks_per_s']:,.1f}", f"{task['wait_s'] * 1000:,.1f} ms",
                      *(f"{task.get(c, 0):,}" for c in columns))
    failures = Table(title="latest failures", expand=True)
    for column in ("worker", "task", "id", "error"):
        failures.add_column(column)
    for failure in snapshot["failures"][:10]:
        failures.add_row(failure["worker"], str(failure["task"]), str(failure["id"]), f"[red]{failure['error']}[/]")
    return Group(workers, kinds, failures)


@click.command("events", context_settings={"help_option_names": ["-h", "--help"]})
@_source_options
@click.option("--dump", is_flag=True, help="Print each event as a JSON line instead of the live view.")
@click.option("--duration", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds (default: until Ctrl-C).")
def events(app_spec: str | None, endpoints: tuple[str, ...], events_endpoints: tuple[str, ...], dump: bool,
           duration: float | None) -> None:
    """Watch the workers' events live: tasks/s per worker and per task, queues, children, failures."""
    receiver = _receiver(app_spec, endpoints, events_endpoints)
    deadline = None if duration is None else time.monotonic() + duration
    state = ClusterState()
    try:
        if dump:
            while deadline is None or time.monotonic() < deadline:
                for worker, event in receiver.receive(REFRESH):
                    kind, task_id, name, timestamp, runtime, info = event
                    click.echo(json.dumps({"worker": worker, "type": kind, "id": task_id, "task": name,
                                           "timestamp": timestamp, "runtime": runtime, "info": info}, default=repr))
            return
        from rich.live import Live

        with Live(render(state.snapshot()), refresh_per_second=1 / REFRESH, screen=False) as live:
            while deadline is None or time.monotonic() < deadline:
                read_into(state, receiver, REFRESH)
                live.update(render(state.snapshot()))
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()


# --- the dashboard ------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>engine dashboard</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.5em; }
table { border-collapse: collapse; min-width: 40em; }
th, td { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.online { color: #080; } .offline { color: #b00; } .error { color: #b00; text-align: left; }
#meta { color: #777; font-size: .85em; }
</style></head>
<body>
<h1>engine workers</h1>
<div id="meta">waiting for events...</div>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>worker</th><th>status</th><th>tasks/s</th><th>busy/children</th>
<th>waiting</th><th>scheduled</th><th>ended</th></tr></thead><tbody></tbody></table>
<h2>Tasks</h2>
<table id="tasks"><thead><tr><th>task</th><th>tasks/s</th><th>wait (ms)</th><th>received</th><th>started</th>
<th>succeeded</th>
<th>failed</th><th>retried</th><th>revoked</th></tr></thead><tbody></tbody></table>
<h2>Latest failures</h2>
<table id="failures"><thead><tr><th>worker</th><th>task</th><th>id</th><th>error</th></tr></thead>
<tbody></tbody></table>
<script>
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td; }
function fill(id, rows) { const body = document.querySelector("#" + id + " tbody"); body.replaceChildren();
  for (const row of rows) { const tr = document.createElement("tr"); row.forEach(c => tr.appendChild(c));
    body.appendChild(tr); } }
async function refresh() {
  try {
    const state = await (await fetch("api/state")).json();
    document.getElementById("meta").textContent = state.events + " events received";
    fill("workers", state.workers.map(w => [cell(w.name), cell(w.online ? "online" : "offline",
      w.online ? "online" : "offline"), cell(w.tasks_per_s), cell((w.busy ?? "-") + "/" + (w.children ?? "-")),
      cell(w.waiting ?? 0), cell(w.scheduled ?? 0), cell(w.ended)]));
    fill("tasks", state.tasks.map(t => [cell(t.name), cell(t.tasks_per_s), cell((t.wait_s * 1000).toFixed(1)),
      cell(t.received ?? 0),
      cell(t.started ?? 0), cell(t.succeeded ?? 0), cell(t.failed ?? 0), cell(t.retried ?? 0),
      cell(t.revoked ?? 0)]));
    fill("failures", state.failures.slice(0, 20).map(f => [cell(f.worker), cell(f.task), cell(f.id),
      cell(f.error, "error")]));
  } catch (e) { document.getElementById("meta").textContent = "dashboard unreachable: " + e; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def make_dashboard(receiver: EventReceiver) -> Any:
    """The dashboard's Flask app, and the thread that folds events in (started here)."""
    from flask import Flask, Response, jsonify

    state = ClusterState()
    lock = threading.Lock()
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            pairs = receiver.receive(0.2)
            with lock:
                for worker, event in pairs:
                    state.add(worker, event)

    app = Flask("engine.dashboard")

    @app.get("/")
    def page() -> Response:
        return Response(PAGE, mimetype="text/html")

    @app.get("/api/state")
    def api_state() -> Response:
        with lock:
            snapshot = state.snapshot()
        return jsonify(snapshot)

    thread = threading.Thread(target=listen, name="engine-dashboard-events", daemon=True)
    thread.start()
    app.config["engine_stop"] = stop
    return app


@click.command("dashboard", context_settings={"help_option_names": ["-h", "--help"]})
@_source_options
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
def dashboard(app_spec: str | None, endpoints: tuple[str, ...], events_endpoints: tuple[str, ...], port: int,
              host: str) -> None:
    """Serve a live web view of the workers' events (the same figures as `engine events`)."""
    from werkzeug.serving import make_server

    receiver = _receiver(app_spec, endpoints, events_endpoints)
    server = make_server(host, port, make_dashboard(receiver), threaded=True)
    click.echo(f"engine dashboard on http://{host}:{server.server_port}/ (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        receiver.close()
