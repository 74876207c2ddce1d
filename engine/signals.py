"""Signals: hooks at known points of a task's and a worker's life, with Celery's names and arguments.

::

    from engine import signals

    @signals.worker_process_init.connect
    def open_pool(**kwargs):              # in every child, after fork (replacements too)
        db.connect()

    @signals.task_prerun.connect(sender=add)    # only for the task ``add``
    def before(sender=None, task_id=None, args=None, **kwargs):
        ...

A receiver is called as ``receiver(signal=..., sender=..., **arguments)``
(Celery's convention: take ``**kwargs``). A receiver that raises is logged and
skipped: the task and the worker go on. Built on ``blinker`` (the signal
library Flask uses: weak references, per-sender receivers), wrapped for
Celery's ``connect(sender=...)`` decorator form, ``dispatch_uid`` and that
error isolation, which blinker's own ``send`` does not do. With no receiver
connected, sending costs one empty-dict check.

Where each is sent (``sender``; arguments):

=========================  =================  ==========================================================
signal                     process            sender; arguments
=========================  =================  ==========================================================
before_task_publish        client             task name; body, exchange, routing_key, headers, properties,
                                              declare, retry_policy (keys added to ``headers`` travel
                                              with the message: the task reads them as ``request.headers``)
after_task_publish         client             task name; body, exchange, routing_key
task_received              supervisor         the supervisor; request
task_prerun                child              task; task_id, task, args, kwargs
task_postrun               child              task; task_id, task, args, kwargs, retval, state
task_success               child              task; result
task_failure               child              task; task_id, exception, args, kwargs, traceback, einfo
task_retry                 child              task; request, reason, einfo
task_revoked               supervisor/child   task; request, terminated, signum, expired
task_unknown               supervisor         the supervisor; name, id, message, exc
task_rejected              supervisor         the supervisor; message, exc (a message that cannot be read)
worker_init                supervisor         the supervisor (before the children are forked)
worker_process_init        child              None (after fork, before the first task)
worker_process_shutdown    child              None; pid, exitcode
worker_ready               supervisor         the supervisor (serving)
worker_shutdown            supervisor         the supervisor (stopped)
setup_logging              worker             None; loglevel, logfile, format, colorize (connected: the
                                              worker leaves logging to the receiver)
after_setup_logger         worker             None; logger, loglevel, logfile, format, colorize
after_setup_task_logger    worker             None; logger, loglevel, logfile, format, colorize
=========================  =================  ==========================================================
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import blinker

__all__ = (
    "Signal", "after_setup_logger", "after_setup_task_logger", "after_task_publish", "before_task_publish",
    "setup_logging", "task_failure", "task_postrun", "task_prerun", "task_received", "task_rejected",
    "task_retry", "task_revoked", "task_success", "task_unknown", "worker_init", "worker_process_init",
    "worker_process_shutdown", "worker_ready", "worker_shutdown",
)

logger = logging.getLogger("engine.signals")


class Signal:
    """One named signal: receivers connect (for every sender or one), :meth:`send` calls them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._signal = blinker.Signal(name)
        #: blinker's own dict of connected receivers (updated in place): empty means "nothing to do".
        self.receivers = self._signal.receivers
        self._by_uid: dict[Any, Callable[..., Any]] = {}

    def connect(self, receiver: Callable[..., Any] | None = None, *, sender: Any = None, weak: bool = True,
                dispatch_uid: Any = None) -> Any:
        """Connect ``receiver`` (for ``sender`` only, when given).

        Usable as ``@sig.connect`` and as ``@sig.connect(sender=task)``. A second
        connect with the same ``dispatch_uid`` is ignored (a module imported twice).
        """
        if receiver is None:
            return lambda function: self.connect(function, sender=sender, weak=weak, dispatch_uid=dispatch_uid)
        if dispatch_uid is not None:
            if dispatch_uid in self._by_uid:
                return receiver
            self._by_uid[dispatch_uid] = receiver
        self._signal.connect(receiver, sender=blinker.ANY if sender is None else _unwrap(sender), weak=weak)
        return receiver

    def disconnect(self, receiver: Callable[..., Any] | None = None, *, sender: Any = None,
                   dispatch_uid: Any = None) -> None:
        """Disconnect a receiver (by itself or by its ``dispatch_uid``)."""
        if dispatch_uid is not None:
            receiver = self._by_uid.pop(dispatch_uid, receiver)
        if receiver is not None:
            self._signal.disconnect(receiver, sender=blinker.ANY if sender is None else _unwrap(sender))

    def send(self, sender: Any = None, **arguments: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver for ``sender``; return ``(receiver, result or the exception it raised)`` pairs."""
        if not self.receivers:
            return []
        responses: list[tuple[Callable[..., Any], Any]] = []
        for receiver in list(self._signal.receivers_for(_unwrap(sender))):
            try:
                result = receiver(signal=self, sender=sender, **arguments)
            except Exception as exc:  # a broken receiver must not break the task or the worker
                logger.exception("signal %s: receiver %r raised", self.name, receiver)
                result = exc
            responses.append((receiver, result))
        return responses

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"


def _unwrap(sender: Any) -> Any:
    """A shared task's proxy stands for its task: receivers connected for one match the other."""
    resolve = getattr(type(sender), "_get_current_object", None)
    return resolve(sender) if resolve is not None else sender


before_task_publish = Signal("before_task_publish")
after_task_publish = Signal("after_task_publish")
task_received = Signal("task_received")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_unknown = Signal("task_unknown")
task_rejected = Signal("task_rejected")
worker_init = Signal("worker_init")
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
setup_logging = Signal("setup_logging")
after_setup_logger = Signal("after_setup_logger")
after_setup_task_logger = Signal("after_setup_task_logger")
