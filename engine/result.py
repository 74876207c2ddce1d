"""Handles on task results: AsyncResult (from a backend) and EagerResult (from ``apply()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine import context, current, states

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.backends.base import Backend
    from engine.core import StateRecord, StateRecorder

__all__ = ("AsyncResult", "EagerResult")


class AsyncResult:
    """The state and result of one task call, read from the app's result backend.

    An unknown id is PENDING. Call :meth:`get` or :meth:`forget` on every
    result you ask for, so the backend can release what it keeps.
    """

    def __init__(self, id: str, backend: Backend | None = None, task_name: str | None = None,
                 app: Engine | None = None, parent: AsyncResult | None = None) -> None:
        self.id = id
        self.app = app
        self._backend = backend
        self.task_name = task_name
        self.parent = parent

    @property
    def backend(self) -> Backend:
        """The backend this result is read from (the current app's when the result was made without one)."""
        if self._backend is not None:
            return self._backend
        if self.app is None:
            self.app = current.get_current_app()
        return self.app.backend

    def _record(self) -> StateRecord | None:
        return self.backend.get(self.id)

    @property
    def state(self) -> str:
        """The task's current state (PENDING when nothing is stored)."""
        record = self._record()
        return record.state if record is not None else states.PENDING

    status = state

    @property
    def result(self) -> Any:
        """The return value, the exception, or a custom state's meta."""
        record = self._record()
        return record.result if record is not None else None

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed task."""
        record = self._record()
        return record.traceback if record is not None else None

    def ready(self) -> bool:
        """True when the task finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """True when the task succeeded."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """True when the task failed."""
        return self.state == states.FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True) -> Any:
        """Wait for the task to finish and return its result.

        Re-raises the task's exception when ``propagate``; raises
        ``engine.exceptions.TimeoutError`` (a builtin TimeoutError) after ``timeout``.
        Waiting inside a task for another task can deadlock a worker, so it is
        refused unless ``disable_sync_subtasks=False``.
        """
        if disable_sync_subtasks and context.current_task() is not None:
            raise RuntimeError("Never call result.get() within a task: it can deadlock the worker's children; "
                               "use a chain or pass disable_sync_subtasks=False")
        record = self.backend.wait_for(self.id, timeout=timeout, interval=interval)
        return self._outcome(record.state, record.result, propagate)

    wait = get

    @staticmethod
    def _outcome(state: str, result: Any, propagate: bool) -> Any:
        if propagate and state in states.PROPAGATE_STATES and isinstance(result, BaseException):
            raise result
        return result

    def forget(self) -> None:
        """Remove the stored state and result."""
        self.backend.forget(self.id)

    def revoke(self, terminate: bool = False, signal: str = "SIGKILL", timeout: float = 1.0) -> dict:
        """Revoke this task on every worker (``app.control.revoke``): it never starts; ``terminate`` stops it."""
        if self.app is None:
            self.app = current.get_current_app()
        replies: dict = self.app.control.revoke(self.id, terminate=terminate, signal=signal, timeout=timeout)
        return replies

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"


class EagerResult(AsyncResult):
    """The result of a call run in this process by ``apply()``: already known, nothing stored."""

    def __init__(self, id: str, retval: Any, state: str, traceback: str | None = None, name: str | None = None,
                 app: Engine | None = None, recorder: StateRecorder | None = None) -> None:
        super().__init__(id, task_name=name, app=app)
        self._retval = retval
        self._state = state
        self._traceback = traceback
        #: Every state the run recorded (custom states from ``update_state`` included).
        self.recorder = recorder

    @property
    def state(self) -> str:
        return self._state

    status = state

    @property
    def result(self) -> Any:
        return self._retval

    info = result

    @property
    def traceback(self) -> str | None:
        return self._traceback

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True) -> Any:
        """Return the result (or re-raise the exception when ``propagate``)."""
        return self._outcome(self._state, self._retval, propagate)

    wait = get

    def forget(self) -> None:
        """Nothing is stored for eager results."""

    def ready(self) -> bool:
        return True
