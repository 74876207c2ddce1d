"""The worker's answers to control requests: ``engine inspect ...`` and ``engine control ...``.

A client sends a ``Q`` frame (``{"id", "method", "arguments"}``) to every
worker endpoint it knows; each worker's supervisor answers with one ``P``
frame from its loop (see :mod:`engine.transport.protocol`). Methods, as in
Celery's remote control:

* inspect: ``ping``, ``stats``, ``active``, ``reserved``, ``scheduled``,
  ``registered``, ``queues``, ``revoked``;
* control: ``revoke``, ``shutdown``, ``pool_grow``, ``pool_shrink``.

The client side is :mod:`engine.control`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

import psutil

from engine.transport import protocol

if TYPE_CHECKING:
    from engine.transport.protocol import Peer
    from engine.worker.scheduler import QueuedTask
    from engine.worker.supervisor import Supervisor

__all__ = ("ControlHandler", "describe")

logger = logging.getLogger("engine.worker")


def describe(entry: QueuedTask, hostname: str, worker_pid: int | None = None) -> dict[str, Any]:
    """A task as the inspect replies show it (Celery's request fields that apply here)."""
    message = entry.message
    started = time.time() - (time.monotonic() - entry.started) if entry.started else None
    return {"id": message.id, "name": message.task, "args": list(message.args), "kwargs": message.kwargs,
            "hostname": hostname, "time_start": started, "worker_pid": worker_pid,
            "delivery_info": {"routing_key": message.queue}, "root_id": message.root_id,
            "parent_id": message.parent_id, "retries": message.retries, "eta": message.eta,
            "expires": message.expires}


class ControlHandler:
    """Answers the control requests a supervisor's consumer received."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.started = time.time()
        self.methods: dict[str, Callable[..., Any]] = {
            "ping": self.ping, "stats": self.stats, "active": self.active, "reserved": self.reserved,
            "scheduled": self.scheduled, "registered": self.registered, "queues": self.queues,
            "revoked": self.revoked, "revoke": self.revoke, "shutdown": self.shutdown,
            "pool_grow": self.pool_grow, "pool_shrink": self.pool_shrink,
        }

    def handle(self, peer: Peer, request: dict) -> None:
        """Run one request and send its reply to ``peer`` (an unknown method or bad arguments get an error)."""
        sup = self.supervisor
        destination = request.get("destination")
        if destination is not None and sup.hostname not in destination:
            return  # for other workers only: not run, no reply
        reply: dict[str, Any] = {"id": request.get("id"), "worker": sup.hostname}
        method = self.methods.get(request["method"])
        arguments = request.get("arguments") or {}
        if method is None:
            reply["error"] = f"unknown control method {request['method']!r} (known: {', '.join(sorted(self.methods))})"
        elif not isinstance(arguments, dict):
            reply["error"] = "arguments must be a map"
        else:
            try:
                reply["reply"] = method(**arguments)
            except (TypeError, ValueError) as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the worker keeps serving; the caller learns why
                logger.exception("control method %s failed", request["method"])
                reply["error"] = f"{type(exc).__name__}: {exc}"
        try:
            body = protocol.pack(reply)
        except (TypeError, ValueError) as exc:  # a value msgpack cannot carry (an odd task argument)
            body = protocol.pack({"id": reply["id"], "worker": sup.hostname, "error": f"unencodable reply: {exc}"})
        if not peer.try_send(protocol.REPLY, body):
            logger.warning("could not send a control reply to %s (its queue is full)", peer.name)

    # --- inspect ---------------------------------------------------------------------

    def ping(self) -> str:
        """``pong``: the worker's loop is turning."""
        return "pong"

    def stats(self) -> dict[str, Any]:
        """Counters, pool, memory, journal, clients' credit and per task name figures."""
        sup = self.supervisor
        children = list(sup.pool.children.values())
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = None
        journal_bytes = None
        if sup.journal_path:
            journal_bytes = sum(os.path.getsize(sup.journal_path + suffix)
                                for suffix in ("", "-wal") if os.path.exists(sup.journal_path + suffix))
        consumer = sup.consumer
        clients = [{"id": peer.name, "credit": dict(peer.credit), "waiting": dict(peer.waiting)}
                   for peer in (consumer.peers if consumer is not None else [])]
        figures = sup.task_stats.snapshot()
        return {
            "hostname": sup.hostname, "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "rss_bytes": rss, "fair": sup.fair, "queues": list(sup.queues),
            "pool": {"max-concurrency": sup.pool.concurrency, "processes": [c.pid for c in children],
                     "busy": sup.pool.busy()},
            "counters": {**figures["counters"], "received": sup.counters["received"], "lost": sup.counters["lost"],
                         "requeued": sup.counters["requeued"], "unknown": sup.counters["unknown"],
                         "malformed": sup.counters["malformed"]},
            "waiting": len(sup.scheduler), "in_children": sup.in_children, "scheduled": len(sup.timers),
            "journal": {"path": sup.journal_path, "bytes": journal_bytes},
            "clients": clients, "revoked": len(sup.revoked), "tasks": figures["tasks"],
        }

    def active(self) -> list[dict[str, Any]]:
        """The tasks running now, one per busy child."""
        sup = self.supervisor
        return [describe(child.outstanding[0], sup.hostname, child.pid)
                for child in sup.pool.children.values() if child.outstanding and child.outstanding[0].started]

    def reserved(self) -> list[dict[str, Any]]:
        """Tasks accepted and not started: waiting for a child, or queued in one behind its running task."""
        sup = self.supervisor
        queued = [describe(entry, sup.hostname, child.pid) for child in sup.pool.children.values()
                  for entry in child.outstanding if not entry.started]
        return queued + [describe(entry, sup.hostname) for entry in sup.scheduler.entries()]

    def scheduled(self) -> list[dict[str, Any]]:
        """Tasks held for a later time (countdown, ETA, retry delay), earliest first."""
        sup = self.supervisor
        return [{"eta": due, "request": describe(entry, sup.hostname)} for due, entry in sup.timers.entries()]

    def registered(self) -> list[str]:
        """The task names this worker can run."""
        return sorted(name for name in self.supervisor.registry if not name.startswith("engine."))

    def queues(self) -> list[dict[str, str]]:
        """The queues this worker consumes."""
        return [{"name": queue, "routing_key": queue} for queue in self.supervisor.queues]

    def revoked(self) -> list[str]:
        """The task ids revoked lately (root ids not included)."""
        return self.supervisor.revoked.task_ids()

    # --- control ---------------------------------------------------------------------

    def revoke(self, task_ids: list[str] | None = None, root_ids: list[str] | None = None,
               terminate: bool = False, signal_name: str = "SIGKILL") -> dict[str, Any]:
        """Revoke tasks by id or by root id; with ``terminate``, stop the running ones (their child is replaced)."""
        signum = _signal_number(signal_name) if terminate else None
        return self.supervisor.revoke([str(i) for i in task_ids or ()], [str(i) for i in root_ids or ()], signum)

    def shutdown(self) -> str:
        """Warm shutdown: finish what was accepted, then exit."""
        self.supervisor.signals.request(signal.SIGTERM)
        return "shutting down"

    def pool_grow(self, n: int = 1) -> dict[str, int]:
        """Add ``n`` children."""
        return {"concurrency": self.supervisor.resize_pool(int(n))}

    def pool_shrink(self, n: int = 1) -> dict[str, int]:
        """Retire ``n`` children (idle ones first; a busy one finishes what it holds)."""
        return {"concurrency": self.supervisor.resize_pool(-int(n))}


def _signal_number(name: str | int) -> int:
    """A signal by name (``SIGKILL``, ``KILL``) or number; the children's stop signals are refused."""
    from engine.worker.child import STOP_SIGNALS

    try:
        signum = int(name) if isinstance(name, int) or str(name).isdigit() else \
            getattr(signal, name if str(name).startswith("SIG") else f"SIG{name}")
    except AttributeError:
        raise ValueError(f"unknown signal {name!r}") from None
    if signum in STOP_SIGNALS:
        raise ValueError(f"children ignore {signal.Signals(signum).name} (a stop signal belongs to the supervisor's "
                         "warm shutdown): terminate with SIGKILL (the default) or another signal")
    return int(signum)
