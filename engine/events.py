"""Task and worker events: published by ``engine-worker -E``, gathered by ``engine events`` and the dashboard.

A worker started with ``-E``/``--events`` binds a ZeroMQ PUB socket at its
events endpoint (:func:`events_endpoint`: the task endpoint's port + 1, or
``--events-endpoint``) and publishes, in batches (one frame per loop turn at
most every :data:`PUBLISH_EVERY` seconds), compact events:

* task events ``[type, task id, task name, timestamp, runtime, info]`` with
  type ``received``, ``started``, ``succeeded``, ``failed``, ``retried``,
  ``revoked``, ``rejected`` or ``lost``; ``info`` is the exception text of a
  failure, else None;
* worker events ``online``, ``heartbeat`` (every :data:`HEARTBEAT` seconds, with
  counters, pool and queue figures) and ``offline``.

A frame is ``[b"engine-events", worker name, msgpack([timestamp, [event, ...]])]``,
each event ``[type, task id, task name, runtime, info]``: the batch's time
stands for its events' (they are at most :data:`PUBLISH_EVERY` apart). Nothing
is kept for a subscriber that is not there (PUB drops), and a slow one loses
events rather than slowing the worker (bounded queue).

:class:`ClusterState` folds events into what the views show: per worker and
per task name, rates over the last :data:`RATE_WINDOW` seconds, failures.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgpack
import zmq

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("ClusterState", "EventPublisher", "EventReceiver", "events_endpoint", "read_into")

TOPIC = b"engine-events"
#: Seconds between two published batches of task events.
PUBLISH_EVERY = 0.1
#: Seconds between two worker heartbeats.
HEARTBEAT = 2.0
#: Seconds the rates (tasks/s) are taken over.
RATE_WINDOW = 5.0
#: A worker not heard from for this long is shown as offline.
WORKER_TIMEOUT = 3 * HEARTBEAT
#: Failures kept per view (the latest).
FAILURES_KEPT = 50
#: Most events queued for subscribers before the newest are dropped (a slow viewer cannot hold memory).
SEND_HWM = 1000


def events_endpoint(endpoint: str) -> str:
    """Where a worker whose tasks come through ``endpoint`` publishes events: port + 1, or ``<path>.events``."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.port is not None:
        host = parts.hostname or "*"
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{parts.port + 1}"
    if parts.scheme in ("ipc", "inproc"):
        return endpoint + ".events"
    raise ValueError(f"cannot derive an events endpoint from {endpoint!r}: give --events-endpoint")


class EventPublisher:
    """The worker's side: collects events during a loop turn and publishes them in batches."""

    def __init__(self, context: zmq.Context, endpoint: str, hostname: str, curve: tuple[str, str] | None = None
                 ) -> None:
        self.hostname = hostname
        self.endpoint = endpoint
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # the worker's keys; its consumer's authenticator admits the clients
            from engine.transport.security import curve_server_socket

            curve_server_socket(self.socket, curve[0])
        self.socket.bind(endpoint)
        #: Events not published yet: ``(type, task id, task name, runtime, info)``.
        self.pending: list[tuple[Any, ...]] = []
        self._next_publish = 0.0
        self._next_heartbeat = 0.0

    def task(self, kind: str, task_id: str, name: str, runtime: float | None = None, info: str | None = None) -> None:
        """Note one task event (published with the next batch)."""
        # Up to three per task in the supervisor's loop: a tuple, no clock read (the batch has the time).
        self.pending.append((kind, task_id, name, runtime, info))

    def worker(self, kind: str, figures: dict | None = None) -> None:
        """Publish a worker event now (``online``, ``heartbeat``, ``offline``)."""
        self.flush(force=True)
        self._send([("worker-" + kind, self.hostname, None, None, figures or {})])

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """Publish the pending task events if the batch is due (or ``force``)."""
        if not self.pending:
            return
        now = time.monotonic() if now is None else now
        if not force and now < self._next_publish:
            return
        self._next_publish = now + PUBLISH_EVERY
        events, self.pending = self.pending, []
        self._send(events)

    def heartbeat_due(self, now: float) -> bool:
        """True once every :data:`HEARTBEAT` seconds."""
        if now < self._next_heartbeat:
            return False
        self._next_heartbeat = now + HEARTBEAT
        return True

    def _send(self, events: list[tuple[Any, ...]]) -> None:
        body = msgpack.packb([time.time(), events], use_bin_type=True)
        try:
            self.socket.send_multipart((TOPIC, self.hostname.encode(), body), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no room: viewers lose these events, the worker never waits for them

    def close(self) -> None:
        """Close the socket (the authenticator too, with CURVE)."""
        self.socket.close(linger=0)


class EventReceiver:
    """Subscribes to the events of every worker of an app (or of the endpoints given)."""

    def __init__(self, app: Engine | None = None, endpoints: Iterable[str] = (),
                 events_endpoints: Iterable[str] = ()) -> None:
        from engine.transport.discovery import expand

        targets = [events_endpoint(e) for e in expand(endpoints)] + list(events_endpoints)
        if app is not None and not targets:
            transport = app.conf.transport
            targets = [events_endpoint(e) for e in expand([transport] if isinstance(transport, str) else transport)]
        if not targets:
            raise ValueError("no workers to listen to: give an app or endpoints")
        self.endpoints = targets
        self.context: zmq.Context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.socket.setsockopt(zmq.LINGER, 0)
        if app is not None:
            from engine.transport.security import secure_app_client

            secure_app_client(app, self.socket)
        for endpoint in targets:
            self.socket.connect(endpoint)

    def receive(self, timeout: float) -> list[tuple[str, list[Any]]]:
        """Wait up to ``timeout`` seconds; return ``(worker, event)`` pairs received (malformed frames skipped)."""
        out: list[tuple[str, list[Any]]] = []
        if not self.socket.poll(max(0, int(timeout * 1000))):
            return out
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(frames) != 3:
                continue
            try:
                timestamp, events = msgpack.unpackb(frames[2], raw=False)
                worker = frames[1].decode()
            except (ValueError, TypeError, UnicodeDecodeError):
                continue
            # As ClusterState takes them: [type, task id, task name, timestamp, runtime, info].
            out.extend((worker, [event[0], event[1], event[2], timestamp, event[3], event[4]])
                       for event in events if isinstance(event, list) and len(event) == 5)

    def close(self) -> None:
        """Stop listening."""
        self.socket.close(linger=0)


class ClusterState:
    """What the events say about the workers and task kinds, for ``engine events`` and the dashboard."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, collections.Counter[str]] = {}
        #: Task name -> worker -> mean wait (received to started, seconds), from the heartbeats.
        self.waits: dict[str, dict[str, float]] = {}
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=FAILURES_KEPT)
        #: (time, worker, task name) of each task that ended lately: the rates.
        self._ended: collections.deque[tuple[float, str, str]] = collections.deque()
        self.events = 0

    def add(self, worker: str, event: list[Any]) -> None:
        """Fold one event in."""
        kind, task_id, name, timestamp, runtime, info = event
        self.events += 1
        entry = self.workers.setdefault(worker, {"name": worker, "online": True, "last_seen": 0.0, "figures": {},
                                                 "ended": 0})
        entry["last_seen"] = max(entry["last_seen"], float(timestamp or 0))
        if kind.startswith("worker-"):
            entry["online"] = kind != "worker-offline"
            if isinstance(info, dict) and info:
                entry["figures"] = info
                for name, wait in (info.get("waits") or {}).items():
                    self.waits.setdefault(str(name), {})[worker] = float(wait)
            return
        counts = self.tasks.setdefault(str(name), collections.Counter())
        counts[kind] += 1
        if kind in ("succeeded", "failed", "revoked", "rejected", "lost"):
            entry["ended"] += 1
            self._ended.append((time.time(), worker, str(name)))
        if kind in ("failed", "lost"):
            self.failures.appendleft({"worker": worker, "task": name, "id": task_id, "time": timestamp,
                                      "error": info or kind})

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for a view: workers (online, tasks/s, figures), task kinds (counts, tasks/s), failures."""
        now = time.time() if now is None else now
        ended = self._ended
        while ended and ended[0][0] < now - RATE_WINDOW:
            ended.popleft()
        per_worker: collections.Counter[str] = collections.Counter(worker for _, worker, _ in ended)
        per_name: collections.Counter[str] = collections.Counter(name for _, _, name in ended)
        workers = []
        for name, entry in sorted(self.workers.items()):
            online = entry["online"] and now - entry["last_seen"] < WORKER_TIMEOUT
            workers.append({"name": name, "online": online, "tasks_per_s": round(per_worker[name] / RATE_WINDOW, 1),
                            "ended": entry["ended"], **{k: entry["figures"].get(k) for k in
                                                        ("busy", "children", "waiting", "scheduled", "in_children")}})
        online = {worker["name"] for worker in workers if worker["online"]}

        def mean_wait(name: str) -> float:
            waits = [wait for worker, wait in self.waits.get(name, {}).items() if worker in online]
            return round(sum(waits) / len(waits), 4) if waits else 0.0

        tasks = [{"name": name, "tasks_per_s": round(per_name[name] / RATE_WINDOW, 1), "wait_s": mean_wait(name),
                  **dict(counts)} for name, counts in sorted(self.tasks.items())]
        return {"workers": workers, "tasks": tasks, "failures": list(self.failures), "events": self.events,
                "time": now}


def read_into(state: ClusterState, receiver: EventReceiver, timeout: float) -> int:
    """Receive for up to ``timeout`` seconds into ``state``; return how many events came."""
    pairs = receiver.receive(timeout)
    for worker, event in pairs:
        state.add(worker, event)
    return len(pairs)

