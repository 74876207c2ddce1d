"""rpc:// replies: each task's states go back to the client that is waiting for them.

With the rpc backend nothing is stored: the supervisor sends every state to
the client named by the task's ``reply_to``, over the link the task came on
when it came from a client, else (a task queued by a child: a chain step, a
retry) to the client known by that id. Routes are kept until the task's
final state went out; tasks that end without a state (``Ignore``, ignored
results) leave theirs behind, so the table is bounded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Union

from engine import states
from engine.transport import protocol

if TYPE_CHECKING:
    from engine.core import StateRecord, TaskMessage
    from engine.transport.consumer import Consumer
    from engine.transport.protocol import Peer

__all__ = ("MAX_REPLY_ROUTES", "ReplyRouter")

logger = logging.getLogger("engine.worker")

#: Routes kept for tasks not finished yet (the oldest are dropped beyond this).
MAX_REPLY_ROUTES = 200_000

#: Where a task's states go: the link it came on, or the id of the client that waits.
Route = Union["Peer", str]


class ReplyRouter:
    """Task id -> route of its states, and the sending of state batches along them."""

    def __init__(self, consumer: Consumer | None = None, max_routes: int = MAX_REPLY_ROUTES) -> None:
        #: Set once the transport is open (the supervisor's start).
        self.consumer = consumer
        self.max_routes = max_routes
        self.routes: dict[str, Route] = {}

    def __len__(self) -> int:
        return len(self.routes)

    def remember(self, message: TaskMessage, peer: Peer | None) -> None:
        """Note where ``message``'s states go, if its client waits for them."""
        if message.reply_to and not message.ignore_result:
            self.routes[message.id] = peer if peer is not None else message.reply_to

    def send(self, records: list[StateRecord]) -> None:
        """Send each client the states of its tasks, one frame per client; forget finished tasks."""
        by_route: dict[Any, list[StateRecord]] = {}
        routes = self.routes
        for record in records:
            route = routes.get(record.task_id)
            if route is None:
                continue
            if record.state in states.READY_STATES:
                del routes[record.task_id]
            by_route.setdefault(route, []).append(record)
        consumer = self.consumer
        for route, batch in by_route.items():
            body = protocol.pack_records(batch)
            if consumer is None:
                sent = False
            elif isinstance(route, str):
                sent = consumer.send_to(route, protocol.RESULTS, body)
            else:
                sent = consumer.send_peer(route, protocol.RESULTS, body)
            if not sent:
                logger.warning("could not return %d result(s) to client %s (gone?)", len(batch), route)

    def prune(self) -> int:
        """Drop the oldest routes beyond ``max_routes``; return how many were dropped."""
        extra = len(self.routes) - self.max_routes
        if extra <= 0:
            return 0
        for task_id in list(self.routes)[:extra]:
            del self.routes[task_id]
        return extra
