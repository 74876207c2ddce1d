"""``engine-worker``: start a worker for an app.

Exit statuses: 0 after a warm shutdown (every accepted task ran), 1 when the
worker cannot start (app not found, address in use, bad option), 2 for a
usage error, 3 after a cold shutdown (running tasks were killed).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

import click

from engine._version import __version__
from engine.exceptions import ImproperlyConfigured
from engine.log import WORKER_FORMAT, TaskContextFilter

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.worker.supervisor import Supervisor

__all__ = ("find_app", "worker_main")



def find_app(spec: str) -> Engine:
    """Import ``module`` or ``module:attr`` and return its Engine.

    ``module`` alone picks the attribute named ``app``, else the only Engine
    in the module. The current directory is importable, as with Celery's ``-A``.
    """
    from engine.app import Engine

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImproperlyConfigured(f"cannot import app module {module_name!r}: {exc}") from exc
    if attr:
        app = getattr(module, attr, None)
        if not isinstance(app, Engine):
            raise ImproperlyConfigured(f"{spec!r} is not an engine.Engine (got {type(app).__name__})")
        return app
    app = getattr(module, "app", None)
    if isinstance(app, Engine):
        return app
    found = [value for value in vars(module).values() if isinstance(value, Engine)]
    if len(found) == 1:
        return found[0]
    raise ImproperlyConfigured(f"module {module_name!r} has {'no' if not found else 'several'} Engine app(s); "
                               f"name one as '{module_name}:attr'")


def setup_logging(level: str) -> None:
    """Log to stderr with process and task fields."""
    handler = logging.StreamHandler()
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="engine-worker", message="%(prog)s %(version)s")
@click.option("-A", "--app", "app_spec", required=True, help="The app: 'module' or 'module:attribute'.")
@click.option("-c", "--concurrency", type=click.IntRange(1), default=None,
              help="Child processes (default: the CPU count).")
@click.option("--fair/--no-fair", default=True, show_default=True,
              help="--fair: give idle children batches of a few ms of expected work, sharing them fairly between "
              "task kinds (short tasks overtake long ones). --no-fair: arrival order with prefetch (Celery's "
              "default mode).")
@click.option("--bind", "binds", multiple=True, help="Endpoint to bind (repeatable; default: the app's transport).")
@click.option("--connect", "connects", multiple=True,
              help="Endpoint of a producer that binds, to connect to (repeatable; the ventilator pattern).")
@click.option("-Q", "--queues", default=None, help="Comma-separated queues to consume (default: task_default_queue).")
@click.option("--backend", default=None, help="Result backend URL (overrides the app's).")
@click.option("--prefetch-multiplier", type=click.IntRange(1), default=None,
              help="Tasks each child holds ahead in the default mode.")
@click.option("--max-tasks-per-child", type=click.IntRange(1), default=None,
              help="Replace a child after it ran this many tasks.")
@click.option("--max-memory-per-child", type=click.IntRange(1), default=None,
              help="Replace a child whose resident memory exceeds this many KiB (checked after each task).")
@click.option("--time-limit", type=float, default=None, help="Hard time limit in seconds: the child is killed.")
@click.option("--soft-time-limit", type=float, default=None,
              help="Soft time limit in seconds: SoftTimeLimitExceeded is raised in the task.")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
@click.option("-n", "--hostname", default=None, help="Worker name (default: engine@HOST-PID).")
@click.option("--curve-secret-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CURVE: this worker's secret key file (from `engine keys`); encrypts and authenticates.")
@click.option("--curve-clients", type=click.Path(exists=True, file_okay=False), default=None,
              help="CURVE: directory of the public key files of the clients allowed to send tasks.")
@click.option("--journal", default=None, type=click.Path(dir_okay=False),
              help="Journal file of accepted, unfinished tasks, replayed at start; one worker at a time "
                   "(default: one per worker name and endpoint under $ENGINE_STATE_DIR or ~/.local/state/engine).")
@click.option("--no-journal", is_flag=True, help="Keep accepted tasks in memory only (faster; a killed "
              "supervisor loses them).")
@click.option("-f", "--logfile", default=None, type=click.Path(dir_okay=False),
              help="Log to this file instead of stderr (reopened when logrotate moves it, and on SIGHUP).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object per line, with the task's name and id.")
@click.option("--log-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A logging.config.dictConfig file (JSON, or YAML by its .yaml/.yml extension).")
@click.option("--pidfile", default=None, type=click.Path(dir_okay=False),
              help="Write the supervisor's pid here; refuse to start if it names a running process.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=None,
              help="On SIGTERM, hand tasks not started back to their clients and give running ones this many "
                   "seconds (then stop them and hand them back too): the journal is left empty.")
@click.option("--autoscale", default=None, metavar="MAX,MIN",
              help="Grow the pool up to MAX children under a backlog, shrink it to MIN when idle.")
@click.option("-E", "--events", is_flag=True, help="Publish task and worker events (engine events, engine dashboard).")
@click.option("--events-endpoint", default=None,
              help="Where to publish events (default: the task endpoint's port + 1).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics (/metrics) and a health probe (/healthz) on this port.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address the metrics server listens on.")
def worker_main(app_spec: str, concurrency: int | None, fair: bool, binds: tuple, connects: tuple,
                queues: str | None, backend: str | None, prefetch_multiplier: int | None,
                max_tasks_per_child: int | None, max_memory_per_child: int | None, time_limit: float | None,
                soft_time_limit: float | None, loglevel: str, hostname: str | None,
                curve_secret_key: str | None, curve_clients: str | None, journal: str | None,
                no_journal: bool, logfile: str | None, log_format: str, log_config: str | None,
                pidfile: str | None, shutdown_timeout: float | None, autoscale: str | None, events: bool,
                events_endpoint: str | None,
                metrics_port: int | None, metrics_host: str) -> None:
    """Run an engine worker: receive tasks over ZeroMQ and run them in prefork children.

    Exit status: 0 warm shutdown, 1 start-up failure, 2 usage error, 3 cold shutdown.
    SIGTERM or SIGINT: warm shutdown (finish accepted tasks); a second one, or SIGQUIT: cold.
    """
    from engine import core
    from engine.worker.logs import configure_logging
    from engine.worker.pidfile import Pidfile
    from engine.worker.supervisor import EXIT_FAILURE, Supervisor

    log = logging.getLogger("engine.worker")
    owned_pidfile = None
    try:
        if bool(curve_secret_key) != bool(curve_clients):
            raise ImproperlyConfigured("CURVE needs both --curve-secret-key and --curve-clients")
        app = find_app(app_spec)
        app.finalize()  # include= and autodiscover_tasks() modules
        # After every module of the app is imported: its setup_logging receivers decide.
        configure_logging(loglevel, logfile, log_format, log_config, bool(app.conf.worker_hijack_root_logger))
        if pidfile:
            owned_pidfile = Pidfile(pidfile)
            owned_pidfile.acquire()
        app.set_current()  # what shared tasks and app-less calls use here and in the children, as in Celery
        if backend:
            app.conf.result_backend = backend
        concurrency = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
        scale = None
        if autoscale:
            from engine.worker.autoscale import parse_autoscale

            scale = parse_autoscale(autoscale)
        # The name as given (None without -n): the Supervisor names an unnamed worker
        # engine@HOST-PID, and keys its default journal on engine@HOST, which a restart keeps.
        supervisor = Supervisor(
            app, concurrency=concurrency, fair=fair, binds=list(binds) or None, connects=list(connects) or None,
            queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
            prefetch_multiplier=prefetch_multiplier, max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child, time_limit=time_limit, soft_time_limit=soft_time_limit,
            hostname=hostname, curve=(curve_secret_key, curve_clients) if curve_secret_key and curve_clients else None,
            journal=journal, use_journal=not no_journal, metrics_port=metrics_port, metrics_host=metrics_host,
            events=events or bool(app.conf.worker_send_task_events), events_endpoint=events_endpoint, autoscale=scale,
            shutdown_timeout=shutdown_timeout)
        supervisor.start()
    except Exception as exc:  # start-up failures: one clear line, no traceback
        if not logging.getLogger().handlers:
            setup_logging(loglevel)  # the failure came before logging was set up
        log.error("cannot start worker: %s", exc)
        if owned_pidfile is not None:
            owned_pidfile.release()
        sys.exit(EXIT_FAILURE)
    _banner(supervisor, app_spec, core)
    log.info("%s ready.", supervisor.hostname)
    try:
        status = supervisor.run()
    finally:
        if owned_pidfile is not None:
            owned_pidfile.release()
    sys.exit(status)


def _banner(supervisor: Supervisor, app_spec: str, core: ModuleType) -> None:
    endpoints = [f"bind {e}" for e in supervisor.binds] + [f"connect {e}" for e in supervisor.connects]
    lines = [
        f"engine-worker {supervisor.hostname}",
        f"  app:         {app_spec} ({len(supervisor.registry)} tasks)",
        f"  transport:   {', '.join(endpoints)}",
        f"  concurrency: {supervisor.concurrency} (prefork"
        + (f", autoscale {supervisor.autoscaler.low}..{supervisor.autoscaler.high}" if supervisor.autoscaler else "")
        + f"), mode: {'fair' if supervisor.fair else 'fifo'}",
        f"  queues:      {', '.join(supervisor.queues)}",
        f"  backend:     {supervisor.app.conf.result_backend or 'disabled'}",
        f"  core:        {'compiled' if core.HAS_EXTENSION else 'pure Python'}",
        f"  journal:     {supervisor.journal_path or 'off'}",
    ]
    if supervisor.events is not None:
        lines.append(f"  events:      {supervisor.events_endpoint}")
    if supervisor.metrics is not None:
        address = f"http://{supervisor.metrics_host}:{supervisor.metrics.port}"
        lines.append(f"  metrics:     {address}/metrics, {address}/healthz")
    if supervisor.curve:
        lines.append("  security:    CURVE (encrypted; only authorized clients)")
    public = [e for e in supervisor.binds
              if not any(h in e for h in ("127.0.0.1", "localhost", "ipc://", "inproc://", "[::1]"))]
    if public and not supervisor.curve:
        lines.append(f"  WARNING: binding {', '.join(public)} without CURVE: anyone who reaches it can run tasks")
    click.echo("\n".join(lines), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="engine", message="%(prog)s %(version)s")
def main() -> None:
    """engine's tools (the worker itself is `engine-worker`)."""


@main.command("keys")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
def keys(directory: str, name: str) -> None:
    """Make a CURVE key pair: DIRECTORY/NAME.key (public) and DIRECTORY/NAME.key_secret.

    Give a worker its .key_secret (--curve-secret-key) and put each allowed
    client's .key in the worker's --curve-clients directory; a client sets
    transport_curve_server_key (the worker's .key) and transport_curve_client_key
    (its own .key_secret).
    """
    from engine.transport.security import make_keys

    public, secret = make_keys(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret}")


def _add_operation_commands() -> None:
    from engine.cli_control import control, inspect
    from engine.cli_events import dashboard, events

    for command in (inspect, control, events, dashboard):
        main.add_command(command)


_add_operation_commands()


if __name__ == "__main__":  # pragma: no cover
    worker_main()
