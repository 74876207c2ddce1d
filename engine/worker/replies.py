"""rpc:// replies: each task's states go back to the client that is waiting for them.

With the rpc backend nothing is stored: the supervisor sends every state to
the client named by the task's ``reply_to``. It goes straight to that client
when the client is connected to this worker; otherwise along the link the
task came on: a worker that forwarded the task (a chain step or a task sent
from a task, routed to a queue only this worker consumes) relays it to its
client. Each record of a results frame names its client, which is all a
relaying worker needs (it remembers nothing of the tasks it forwarded).

Routes are kept until the task's final state went out. States a running task
records for other task ids (the later steps of its failing chain) follow the
route of the running task. Tasks that end without a state (``Ignore``,
ignored results) leave their route behind, so the table is bounded.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import TYPE_CHECKING, Any, Optional

from engine import states
from engine.transport import protocol

if TYPE_CHECKING:
    from engine.core import StateRecord, TaskMessage
    from engine.transport.consumer import Consumer
    from engine.transport.producer import Producer
    from engine.transport.protocol import Peer

__all__ = ("MAX_REPLY_ROUTES", "ReplyRouter")

logger = logging.getLogger("engine.worker")

#: Routes kept for tasks not finished yet (the oldest are dropped beyond this).
MAX_REPLY_ROUTES = 200_000
#: Results frames from other workers waiting to be relayed (the oldest are dropped beyond this).
MAX_RELAYED = 10_000

#: Where a task's states go: the id of the client that waits, and the link the task came on.
Route = tuple[str, Optional["Peer"]]


class ReplyRouter:
    """Task id -> route of its states; sends state batches along them and relays other workers'."""

    def __init__(self, consumer: Consumer | None = None, max_routes: int = MAX_REPLY_ROUTES) -> None:
        #: Set once the transport is open (the supervisor's start).
        self.consumer = consumer
        self.max_routes = max_routes
        self.routes: dict[str, Route] = {}
        #: Results frames other workers sent back for tasks this worker forwarded (filled by the
        #: producer's I/O thread, emptied by the supervisor's loop after a byte on :attr:`wake_fd`).
        self._relayed: collections.deque[bytes] = collections.deque(maxlen=MAX_RELAYED)
        self._listening_to: Producer | None = None
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)

    def __len__(self) -> int:
        return len(self.routes)

    def remember(self, message: TaskMessage, link: Peer | None) -> None:
        """Note where ``message``'s states go, if its client waits for them.

        ``link`` is the peer the message came from; None for a message a child
        sent, which then travels back the way its parent task (or, for a retry,
        its earlier attempt) came.
        """
        if not message.reply_to or message.ignore_result:
            return
        if link is None:
            earlier = self.routes.get(message.id) or self.routes.get(message.parent_id or "")
            link = earlier[1] if earlier is not None else None
        self.routes[message.id] = (message.reply_to, link)

    def follow(self, task_id: str, running_id: str) -> None:
        """States recorded for ``task_id`` by the task ``running_id`` go where that task's go."""
        if task_id not in self.routes:
            route = self.routes.get(running_id)
            if route is not None:
                self.routes[task_id] = route

    def send(self, records: list[StateRecord]) -> None:
        """Send each client the states of its tasks, one frame per link; forget finished tasks."""
        routes = self.routes
        by_route: dict[Route, list[StateRecord]] = {}
        for record in records:
            route = routes.get(record.task_id)
            if route is None:
                continue
            if record.state in states.READY_STATES:
                del routes[record.task_id]
            by_route.setdefault(route, []).append(record)
        for (client_id, link), batch in by_route.items():
            self._deliver(client_id, link, batch)

    def _deliver(self, client_id: str, link: Peer | None, batch: list[Any]) -> None:
        consumer = self.consumer
        peer = None
        relayed_by = None
        if consumer is not None:
            peer = consumer.find_client(client_id)
            if peer is None and link is not None and link in consumer.peers:
                peer = relayed_by = link  # a worker that forwarded the task: it relays to the client
        # Records name their client only for a relaying worker: a client of an earlier version
        # reads records of five fields.
        body = protocol.pack_records(batch, client_id if relayed_by is not None else None)
        if peer is None or not peer.try_send(protocol.RESULTS, body):
            logger.warning("could not return %d result(s) to client %s (gone?)", len(batch), client_id)

    # --- relaying other workers' results ---------------------------------------------

    def listen(self, producer: Producer) -> None:
        """Relay results frames that come back to ``producer`` (this worker's own client side)."""
        if producer is not self._listening_to:
            producer.add_result_handler(self._on_relayed)
            self._listening_to = producer

    def _on_relayed(self, body: bytes) -> None:
        # The producer's I/O thread: hand the frame to the supervisor's loop and wake it.
        self._relayed.append(body)
        try:
            os.write(self._wake_w, b"r")
        except (BlockingIOError, OSError):
            pass  # the loop is already due to wake up

    def relay(self) -> int:
        """Pass the results frames other workers sent back on to their clients; return how many records."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        relayed = 0
        while self._relayed:
            body = self._relayed.popleft()
            try:
                addressed = protocol.unpack_addressed_records(body)
            except Exception as exc:
                logger.warning("dropped a malformed results frame from another worker: %s", exc)
                continue
            by_client: dict[str, list[StateRecord]] = {}
            for record, client_id in addressed:
                route = self.routes.get(record.task_id)
                client_id = client_id or (route[0] if route else None)
                if client_id:
                    by_client.setdefault(client_id, []).append(record)
            for client_id, batch in by_client.items():
                self._deliver(client_id, None, batch)
                relayed += len(batch)
        return relayed

    def prune(self) -> int:
        """Drop the oldest routes beyond ``max_routes``; return how many were dropped."""
        extra = len(self.routes) - self.max_routes
        if extra <= 0:
            return 0
        for task_id in list(self.routes)[:extra]:
            del self.routes[task_id]
        return extra

    def close(self) -> None:
        """Close the wake-up pipe."""
        for fd in (self.wake_fd, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
