"""The RPC backend (``rpc://``): results come back to the calling client as messages.

Like Celery's RPC backend, nothing is stored anywhere: the worker sends each
state of a task to the client that sent it, over the same ZeroMQ link the
task came on (a chain step or a retry sent from inside a task finds the
original client by the ``reply_to`` id the message carries). The client's
producer thread hands them to this backend, which wakes waiting ``get()``
calls at once: real time, no polling.

The limits are Celery's too, and worth knowing: a result can be read only by
the client process that sent the task (another process, or this one after a
restart, sees PENDING), it is lost if that client is gone when the result
arrives, and it lives in that client's memory until ``forget()`` (or until it
is among the oldest of ``max_entries`` results).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from engine.backends.memory import MemoryBackend
from engine.core import StateRecord, StateRecorder
from engine.transport.protocol import unpack_records

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("RPCBackend",)

#: Results a client keeps before the oldest are dropped.
MAX_ENTRIES = 100_000


class RPCBackend(MemoryBackend):
    """Results of this client's tasks, as the workers send them back (an in-memory table)."""

    #: The supervisor sends states over the transport instead of calling ``store``.
    replies_over_transport = True
    #: Always set (``app.backend`` makes this backend): results come through its producer.
    app: Engine

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        super().__init__(url, app)
        self._table = StateRecorder(max_entries=MAX_ENTRIES)
        self._producer: Any = None

    def listen(self) -> Any:
        """Make sure this process's producer hands results to this backend; return the producer.

        Called before a task is sent, so a result that comes back before anyone
        calls ``get()`` is kept. The producer is per process (a new one after a
        fork or ``close()``), so this registers with the current one.
        """
        producer = self.app.producer
        if producer is not self._producer:
            producer.add_result_handler(self._on_results)
            self._producer = producer
        return producer

    def _on_results(self, body: bytes) -> None:
        self.store(unpack_records(body))

    def get_encoded(self, task_id: str) -> StateRecord | None:
        self.listen()
        return super().get_encoded(task_id)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5) -> StateRecord:
        self.listen()
        return super().wait_for(task_id, timeout, interval)

    def get_many_encoded(self, task_ids: Sequence[str]) -> dict[str, StateRecord]:
        self.listen()
        return super().get_many_encoded(task_ids)

    def wait_for_many(self, task_ids: Sequence[str], timeout: float | None = None,
                      interval: float = 0.5,
                      on_ready: Callable[[int], None] | None = None) -> dict[str, StateRecord]:
        self.listen()
        return super().wait_for_many(task_ids, timeout, interval, on_ready)
