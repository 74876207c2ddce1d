"""Every exception the engine raises or lets tasks raise.

Each exception keeps its constructor arguments in ``.args`` (the Tasks guide's
pickling rule), so it survives pickle and the engine's own exception transport,
which rebuilds an exception from its type name and ``.args``.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.canvas import Signature

__all__ = (
    "CeleryCompatibilityWarning",
    "ChordError",
    "DuplicateTaskError",
    "EncodeError",
    "EngineError",
    "Ignore",
    "ImproperlyConfigured",
    "MaxRetriesExceededError",
    "MessageDecodeError",
    "NotRegistered",
    "OutboxFull",
    "Reject",
    "RemoteTaskError",
    "ResultsDisabledError",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "UnknownSettingError",
    "WorkerLostError",
)


class EngineError(Exception):
    """Base class of the engine's own errors (not of the semipredicates)."""


class ImproperlyConfigured(EngineError, ValueError):
    """The app or worker was given a setting or option it cannot use."""


class UnknownSettingError(ImproperlyConfigured, AttributeError):
    """A setting name that the engine does not know (most often a typo)."""


class DuplicateTaskError(EngineError, ValueError):
    """Two different functions were registered under one task name."""


class MessageDecodeError(EngineError, ValueError):
    """Bytes that are not a valid task message (the core's one decode error)."""


class NotRegistered(EngineError, KeyError):
    """No task of this name is in the registry."""

    def __str__(self) -> str:  # KeyError would quote the repr.
        name = self.args[0] if self.args else "?"
        return f"Task of name {name!r} is not registered (is its module imported by the worker?)"


class Retry(Exception):
    """Raised by ``Task.retry()`` to tell the tracer the task is being retried.

    ``message`` explains why, ``exc`` is the exception that caused the retry
    (or None) and ``when`` the countdown in seconds or an ETA.
    """

    #: The signature that re-runs the task (set by ``Task.retry``).
    sig: Signature | None = None
    #: True when the retry happens in an eager ``apply()``.
    is_eager: bool = False

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: Any = None, *, sig: Signature | None = None, is_eager: bool = False) -> None:
        super().__init__(message, exc, when)
        self.message = message
        self.exc = exc
        self.when = when
        self.sig = sig
        self.is_eager = is_eager

    def humanize(self) -> str:
        """Say when the retry happens, for log lines."""
        if isinstance(self.when, (int, float)):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc is not None:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"


class Ignore(Exception):
    """Raised by a task so that no state is recorded for it; its message is still acknowledged."""


class Reject(Exception):
    """Raised by a task to reject its message: re-queued when ``requeue`` is true, else dropped."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        super().__init__(reason, requeue)
        self.reason = reason
        self.requeue = requeue

    def __str__(self) -> str:
        return f"Rejected (requeue={self.requeue}): {self.reason!r}"


class MaxRetriesExceededError(EngineError):
    """A task asked to retry more often than its ``max_retries`` allows."""

    def __init__(self, *args: Any, task_args: Any = None, task_kwargs: Any = None) -> None:
        super().__init__(*args)
        self.task_args = task_args
        self.task_kwargs = task_kwargs


class TaskRevokedError(EngineError):
    """The task was revoked (or had expired) before it could run."""


class WorkerLostError(EngineError):
    """The pool child running the task died (killed, crashed, out of memory)."""


class TimeLimitExceeded(EngineError):
    """The task ran past its hard time limit; its child process was killed."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task that ran past its soft time limit, so it can clean up."""


class ResultsDisabledError(ImproperlyConfigured):
    """Results were asked for, but the app has no result backend configured."""


class TimeoutError(EngineError, builtins.TimeoutError):
    """``AsyncResult.get(timeout=...)`` ran out of time; also a builtin ``TimeoutError``."""


class EncodeError(EngineError, TypeError):
    """A task's arguments or return value cannot be serialized (the message names the type)."""


class RemoteTaskError(EngineError):
    """Stand-in for a task exception whose class cannot be rebuilt in this process.

    ``type_name`` is the original ``module.QualName``, ``message`` its text.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class OutboxFull(EngineError):
    """The client holds ``producer_max_outbox`` messages no worker has taken yet."""


class ChordError(EngineError):
    """A chord's header task failed, so its body did not run (the chord's result, as in Celery)."""


class CeleryCompatibilityWarning(UserWarning):
    """Celery code asked for something that has no meaning without a broker (it is ignored, said once)."""
