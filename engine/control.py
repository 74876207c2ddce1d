"""Remote control of running workers: ``app.control`` (Celery's API) and what ``engine inspect/control`` use.

A request goes to every worker endpoint of the app (or those given) over the
same transport as tasks (same endpoints, same CURVE keys), and each worker
answers once from its loop (:mod:`engine.worker.control`). Replies are
collected until every endpoint answered or ``timeout`` passed::

    app.control.inspect().stats()          # {"engine@host": {...}, ...}, or None when nobody answered
    app.control.ping()                     # [{"engine@host": {"ok": "pong"}}]
    app.control.revoke(task_id)            # never starts, wherever it waits
    app.control.revoke(task_id, terminate=True)    # running: its child is killed (SIGKILL) and replaced
    app.control.revoke_by_root(root_id)    # every task of a chain or batch started from root_id
    app.control.pool_grow(2); app.control.shutdown()

Workers that ``--connect`` to a client that binds (``transport_bind=True``)
cannot be reached this way yet: control needs workers that bind.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zmq

from engine.exceptions import ImproperlyConfigured
from engine.transport import protocol
from engine.transport.security import secure_app_client
from engine.utils.hostname import HOSTNAME

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("Control", "Inspect")

#: Seconds a request waits for replies by default (Celery's default too).
DEFAULT_TIMEOUT = 1.0


class Control:
    """Send control requests to workers and gather their replies (``app.control``)."""

    def __init__(self, app: Engine) -> None:
        self.app = app

    def broadcast(self, method: str, arguments: dict | None = None, *, destination: Iterable[str] | None = None,
                  timeout: float = DEFAULT_TIMEOUT, endpoints: Iterable[str] | None = None,
                  limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Ask every worker (or those named in ``destination``) to run ``method``; return replies by worker name.

        Each value is ``{"ok": reply}`` or ``{"error": message}``. Waits until every
        endpoint answered, ``limit`` replies came, or ``timeout`` seconds passed.
        """
        targets = list(endpoints) if endpoints is not None else _endpoints(self.app)
        wanted = set(destination) if destination is not None else None
        request_id = uuid.uuid4().hex
        request: dict[str, Any] = {"id": request_id, "method": method, "arguments": arguments or {}}
        if wanted is not None:
            request["destination"] = sorted(wanted)  # the other workers ignore it (and do not reply)
        body = protocol.pack(request)
        context: zmq.Context = zmq.Context.instance()
        sockets = []
        replies: dict[str, dict[str, Any]] = {}
        try:
            poller = zmq.Poller()
            for endpoint in targets:
                sock = context.socket(zmq.DEALER)
                protocol.tune_socket(sock, int(self.app.conf.max_message_size))
                sock.setsockopt(zmq.ROUTING_ID, f"control-{HOSTNAME}-{request_id[:12]}".encode())
                secure_app_client(self.app, sock)
                sock.connect(endpoint)
                sock.send_multipart((protocol.CONTROL, body), flags=zmq.NOBLOCK)
                poller.register(sock, zmq.POLLIN)
                sockets.append(sock)
            answered: set[int] = set()
            deadline = time.monotonic() + timeout
            # With a destination, the workers not named stay silent: wait for the named ones.
            expected = len(sockets) if wanted is None else min(len(sockets), len(wanted))
            while len(answered) < expected and (limit is None or len(replies) < limit):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for sock, _ in poller.poll(max(1, int(left * 1000))):
                    frames = sock.recv_multipart()
                    if len(frames) != 2 or frames[0] != protocol.REPLY:
                        continue
                    try:
                        reply = protocol.unpack(frames[1])
                    except ValueError:
                        continue
                    if not isinstance(reply, dict) or reply.get("id") != request_id:
                        continue  # a late reply to an earlier request
                    answered.add(id(sock))
                    worker = str(reply.get("worker"))
                    replies[worker] = {"error": reply["error"]} if "error" in reply else {"ok": reply.get("reply")}
        finally:
            for sock in sockets:
                sock.close(linger=0)
        return replies

    def inspect(self, destination: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                endpoints: Iterable[str] | None = None) -> Inspect:
        """Ask workers what they are doing (see :class:`Inspect`)."""
        return Inspect(self, destination, timeout, endpoints)

    def ping(self, destination: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
             **kwargs: Any) -> list[dict[str, dict[str, Any]]]:
        """``[{worker: {"ok": "pong"}}, ...]``, one item per worker that answered (Celery's shape)."""
        replies = self.broadcast("ping", destination=destination, timeout=timeout, **kwargs)
        return [{worker: reply} for worker, reply in replies.items()]

    def revoke(self, task_id: str | Iterable[str], destination: Iterable[str] | None = None,
               terminate: bool = False, signal: str = "SIGKILL", timeout: float = DEFAULT_TIMEOUT,
               **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Revoke one task id or many: none of them starts; with ``terminate`` a running one is killed.

        Unlike Celery, ``signal`` defaults to SIGKILL: children ignore SIGTERM (the
        stop signals belong to the supervisor's warm shutdown).
        """
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self.broadcast("revoke", {"task_ids": ids, "terminate": terminate, "signal_name": signal},
                              destination=destination, timeout=timeout, **kwargs)

    def revoke_by_root(self, root_id: str | Iterable[str], destination: Iterable[str] | None = None,
                       terminate: bool = False, signal: str = "SIGKILL", timeout: float = DEFAULT_TIMEOUT,
                       **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Revoke every task whose root is ``root_id`` (a chain's or a batch's first task), and that task."""
        ids = [root_id] if isinstance(root_id, str) else list(root_id)
        return self.broadcast("revoke", {"root_ids": ids, "terminate": terminate, "signal_name": signal},
                              destination=destination, timeout=timeout, **kwargs)

    def shutdown(self, destination: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                 **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Warm shutdown of the workers: they finish what they accepted, then exit."""
        return self.broadcast("shutdown", destination=destination, timeout=timeout, **kwargs)

    def pool_grow(self, n: int = 1, destination: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                  **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Add ``n`` children to each worker's pool."""
        return self.broadcast("pool_grow", {"n": int(n)}, destination=destination, timeout=timeout, **kwargs)

    def pool_shrink(self, n: int = 1, destination: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                    **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Retire ``n`` children of each worker's pool (idle ones first)."""
        return self.broadcast("pool_shrink", {"n": int(n)}, destination=destination, timeout=timeout, **kwargs)


class Inspect:
    """Read-only questions to workers; each returns ``{worker name: reply}``, or None when nobody answered."""

    def __init__(self, control: Control, destination: Iterable[str] | None, timeout: float,
                 endpoints: Iterable[str] | None) -> None:
        self.control = control
        self.destination = list(destination) if destination is not None else None
        self.timeout = timeout
        self.endpoints = list(endpoints) if endpoints is not None else None

    def _ask(self, method: str) -> dict[str, Any] | None:
        replies = self.control.broadcast(method, destination=self.destination, timeout=self.timeout,
                                         endpoints=self.endpoints)
        if not replies:
            return None
        return {worker: reply.get("ok", reply) for worker, reply in replies.items()}

    def ping(self) -> dict[str, Any] | None:
        """``{worker: "pong"}``."""
        return self._ask("ping")

    def stats(self) -> dict[str, Any] | None:
        """Counters, pool, memory, journal, clients' credit, per task name counts and timings."""
        return self._ask("stats")

    def active(self) -> dict[str, Any] | None:
        """The tasks running now."""
        return self._ask("active")

    def reserved(self) -> dict[str, Any] | None:
        """Tasks accepted and not started yet."""
        return self._ask("reserved")

    def scheduled(self) -> dict[str, Any] | None:
        """Tasks held for a later time (countdown, ETA, retry delay)."""
        return self._ask("scheduled")

    def registered(self) -> dict[str, Any] | None:
        """The task names each worker can run."""
        return self._ask("registered")

    def active_queues(self) -> dict[str, Any] | None:
        """The queues each worker consumes (Celery's name)."""
        return self._ask("queues")

    queues = active_queues

    def revoked(self) -> dict[str, Any] | None:
        """The task ids each worker holds as revoked."""
        return self._ask("revoked")


def _endpoints(app: Engine) -> list[str]:
    if app.conf.transport_bind:
        raise ImproperlyConfigured("remote control reaches workers that bind (the default); with "
                                   "transport_bind=True the workers connect to the client and cannot be asked")
    from engine.transport.discovery import expand

    endpoints = app.conf.transport
    return expand([endpoints] if isinstance(endpoints, str) else list(endpoints))  # every worker a name stands for

