"""``engine inspect ...`` and ``engine control ...``: ask running workers, or tell them what to do.

Both reach the workers of ``-A APP`` (its transport endpoints and CURVE keys)
or the ``--endpoint`` URLs given, wait ``--timeout`` seconds for one reply per
worker, print them (``--json``: ``{worker name: reply}``, stable), and exit
with status 1 when no worker answered, so ``engine inspect ping`` is a
liveness probe.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

__all__ = ("control", "inspect")

INSPECT_METHODS = ("ping", "stats", "active", "reserved", "scheduled", "registered", "queues", "revoked")


def _target_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every inspect/control command takes: which workers, how long to wait, how to print."""
    for option in reversed((
        click.option("-A", "--app", "app_spec", default=None, help="The app whose workers to reach ('module[:attr]')."),
        click.option("--endpoint", "endpoints", multiple=True,
                     help="A worker endpoint to reach (repeatable; instead of, or besides, the app's)."),
        click.option("-d", "--destination", multiple=True, help="Only the worker with this name (repeatable)."),
        click.option("-t", "--timeout", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
                     help="Seconds to wait for replies."),
        click.option("-j", "--json", "as_json", is_flag=True, help="Print {worker: reply} as JSON."),
    )):
        command = option(command)
    return command


def _control_of(app_spec: str | None, endpoints: tuple[str, ...]) -> tuple[Any, list[str] | None]:
    from engine.app import Engine
    from engine.cli import find_app

    if app_spec:
        app = find_app(app_spec)
        return app.control, (list(endpoints) or None)
    if not endpoints:
        raise click.UsageError("say which workers: -A APP or --endpoint URL")
    return Engine("engine-control", set_as_current=False).control, list(endpoints)


def _print(replies: dict[str, dict[str, Any]], as_json: bool, ok_text: Callable[[Any], str] | None = None) -> None:
    if not replies:
        click.echo("Error: no worker replied within the timeout.", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({worker: reply.get("ok", reply) for worker, reply in sorted(replies.items())},
                              indent=2, sort_keys=True, default=repr))
        return
    for worker, reply in sorted(replies.items()):
        if "error" in reply:
            click.echo(f"-> {worker}: ERROR {reply['error']}")
        elif ok_text is not None:
            click.echo(f"-> {worker}: {ok_text(reply['ok'])}")
        else:
            click.echo(f"-> {worker}: OK")
            body = json.dumps(reply["ok"], indent=2, sort_keys=True, default=repr)
            click.echo("\n".join("    " + line for line in body.splitlines()))
    if all("error" in reply for reply in replies.values()):
        sys.exit(1)


@click.command("inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("method", type=click.Choice(INSPECT_METHODS))
@_target_options
def inspect(method: str, app_spec: str | None, endpoints: tuple[str, ...], destination: tuple[str, ...],
            timeout: float, as_json: bool) -> None:
    """Ask running workers: ping, stats, active, reserved, scheduled, registered, queues, revoked."""
    control, targets = _control_of(app_spec, endpoints)
    replies = control.broadcast(method, destination=destination or None, timeout=timeout, endpoints=targets)
    _print(replies, as_json, (lambda reply: str(reply)) if method == "ping" else None)


@click.group("control", context_settings={"help_option_names": ["-h", "--help"]})
def control() -> None:
    """Tell running workers what to do: revoke, shutdown, pool-grow, pool-shrink."""


@control.command("revoke")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="Also stop the task if it is running (its child is replaced).")
@click.option("--signal", "signal_name", default="SIGKILL", show_default=True,
              help="The signal --terminate sends (children ignore SIGTERM, SIGINT and SIGQUIT).")
@click.option("--root", is_flag=True, help="The ids are root ids: revoke every task of those chains or batches.")
@_target_options
def revoke(task_ids: tuple[str, ...], terminate: bool, signal_name: str, root: bool, app_spec: str | None,
           endpoints: tuple[str, ...], destination: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Revoke tasks: they never start; with --terminate a running one is stopped. All end REVOKED."""
    remote, targets = _control_of(app_spec, endpoints)
    send = remote.revoke_by_root if root else remote.revoke
    replies = send(list(task_ids), terminate=terminate, signal=signal_name, destination=destination or None,
                   timeout=timeout, endpoints=targets)
    _print(replies, as_json, lambda r: (f"revoked {len(task_ids)} id(s); taken out while waiting: {len(r['revoked'])}, "
                                        f"terminated: {len(r['terminated'])}"))


@control.command("shutdown")
@_target_options
def shutdown(app_spec: str | None, endpoints: tuple[str, ...], destination: tuple[str, ...], timeout: float,
             as_json: bool) -> None:
    """Warm shutdown: each worker finishes the tasks it accepted, then exits."""
    remote, targets = _control_of(app_spec, endpoints)
    _print(remote.shutdown(destination=destination or None, timeout=timeout, endpoints=targets), as_json, str)


@control.command("pool-grow")
@click.argument("n", type=click.IntRange(1), default=1)
@_target_options
def pool_grow(n: int, app_spec: str | None, endpoints: tuple[str, ...], destination: tuple[str, ...],
              timeout: float, as_json: bool) -> None:
    """Add N children to each worker's pool."""
    remote, targets = _control_of(app_spec, endpoints)
    _print(remote.pool_grow(n, destination=destination or None, timeout=timeout, endpoints=targets), as_json,
           lambda r: f"pool is now {r['concurrency']} children")


@control.command("pool-shrink")
@click.argument("n", type=click.IntRange(1), default=1)
@_target_options
def pool_shrink(n: int, app_spec: str | None, endpoints: tuple[str, ...], destination: tuple[str, ...],
                timeout: float, as_json: bool) -> None:
    """Retire N children of each worker's pool (idle ones first; at least one stays)."""
    remote, targets = _control_of(app_spec, endpoints)
    _print(remote.pool_shrink(n, destination=destination or None, timeout=timeout, endpoints=targets), as_json,
           lambda r: f"pool is now {r['concurrency']} children")
