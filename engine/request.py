"""The worker's request: one task message turned into a traced call.

"Upon receiving a message to run a task, the worker creates a request to
represent such demand" (the Tasks guide). A :class:`Request` builds the task's
:class:`~engine.context.Context` from a :class:`TaskMessage`, runs it through
the tracer and calls its own hooks, which a custom request class (a task's
``Request`` attribute) overrides, e.g. to log timeouts or failures.
``Task.apply()`` runs eager calls through this same class.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from engine import signals, states
from engine.context import Context
from engine.core import request_fields
from engine.exceptions import TaskRevokedError
from engine.tracer import ExceptionInfo, TraceOutcome, trace_task
from engine.utils.hostname import HOSTNAME

if TYPE_CHECKING:
    from engine.core import TaskMessage
    from engine.task import Task
    from engine.tracer import Recorder

__all__ = ("Request", "request_context")

logger = logging.getLogger("engine.request")



def request_context(message: TaskMessage, hostname: str, eager: bool = False, retry_dispatcher: Any = None) -> Context:
    """``task.request`` for running ``message`` (what :meth:`Request.context` returns)."""
    return Context.of(request_fields(message, eager, hostname, retry_dispatcher))


class Request:
    """A task message accepted for execution, and how to run it.

    ``message`` is a core ``TaskMessage``; ``task`` the registered task it
    names; ``recorder`` receives the states (see :mod:`engine.tracer`).
    """

    def __init__(self, message: TaskMessage, task: Task, *, recorder: Recorder | None = None,
                 hostname: str | None = None, eager: bool = False, retry_dispatcher: Any = None) -> None:
        self.message = message
        self.task = task
        self.recorder = recorder
        self.hostname = hostname or HOSTNAME
        self.eager = eager
        self.retry_dispatcher = retry_dispatcher
        self.time_accepted: float | None = None

    @property
    def id(self) -> str:
        """The task id."""
        return self.message.id

    @property
    def name(self) -> str:
        """The task name."""
        return self.message.task

    @property
    def args(self) -> tuple:
        """Positional arguments of the call."""
        return self.message.args

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of the call."""
        return self.message.kwargs

    def expired(self, now: float | None = None) -> bool:
        """Tell whether the message's ``expires`` time has passed."""
        expires = self.message.expires
        return expires is not None and (now if now is not None else time.time()) >= expires

    def context(self) -> Context:
        """Build ``task.request`` for this call."""
        return request_context(self.message, self.hostname, self.eager, self.retry_dispatcher)

    def execute(self, propagate: bool = False) -> TraceOutcome:
        """Run the task and return its outcome, calling this request's hooks.

        An expired message is not run: it is recorded REVOKED (workers only;
        eager calls ignore ``expires``, as Celery's ``apply()`` does).
        """
        self.time_accepted = time.time()
        self.on_accepted(self.time_accepted)
        if not self.eager and self.expired(self.time_accepted):
            return self._revoke_expired()
        outcome = trace_task(self.task, self.context(), self.recorder, eager=self.eager, propagate=propagate)
        if outcome.state == states.SUCCESS:
            self.on_success(outcome.retval, outcome.runtime)
        elif outcome.state == states.FAILURE:
            self.on_failure(outcome.einfo)
        elif outcome.state == states.RETRY:
            self.on_retry(outcome.einfo)
        elif outcome.state == states.REJECTED:
            self.on_reject(outcome.retval)
        return outcome

    def _revoke_expired(self) -> TraceOutcome:
        exc = TaskRevokedError("expired")
        logger.info("Task %s[%s] expired before it could run", self.name, self.id)
        if self.recorder is not None:
            self.recorder.record(self.id, states.REVOKED, exc, None)
        if signals.task_revoked.receivers:
            signals.task_revoked.send(sender=self.task, request=self, terminated=False, signum=None, expired=True)
        return TraceOutcome(states.REVOKED, exc, None, 0.0)

    # Hooks: a custom request class overrides these (calling super() first).

    def on_accepted(self, time_accepted: float) -> None:
        """Called when the request is about to run."""

    def on_success(self, retval: Any, runtime: float) -> None:
        """Called after the task returned."""

    def on_failure(self, exc_info: ExceptionInfo | None, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        """Called after the task failed; ``exc_info.exception`` is the error."""

    def on_retry(self, exc_info: ExceptionInfo | None) -> None:
        """Called after the task asked to be retried."""

    def on_reject(self, reject: Any) -> None:
        """Called after the task raised Reject."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Called when the task ran past its soft (``soft=True``) or hard time limit."""
        if soft:
            logger.warning("Soft time limit (%ss) exceeded for %s[%s]", timeout, self.name, self.id)
        else:
            logger.error("Hard time limit (%ss) exceeded for %s[%s]", timeout, self.name, self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.name}[{self.id}]>"
