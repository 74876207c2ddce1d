"""What ``self.request`` holds while a task runs, and which task is running.

Each thread has a stack of ``(task, Context)`` pairs: the tracer pushes one
before it calls the task and pops it after, and ``Task.request``,
``get_task_logger`` and ``update_state`` read the top. A task called directly
(``add(2, 2)``) pushes a Context with ``called_directly=True``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.task import Task
    from engine.tracer import Recorder

__all__ = ("Context", "current", "current_task", "pop", "push", "running")


class Context:
    """The request of a running task: its id, arguments and delivery details.

    Attributes match Celery's ``Task.request`` where they exist. ``recorder`` is
    where ``update_state`` writes states for this run (the worker's or an eager
    result's); ``retry_dispatcher`` is how ``retry()`` hands a retry message back
    to whatever runs the task.
    """

    id: str | None = None
    task: str | None = None
    args: tuple = ()
    kwargs: dict = {}
    retries: int = 0
    eta: float | None = None
    expires: float | None = None
    is_eager: bool = False
    hostname: str | None = None
    delivery_info: dict = {}
    reply_to: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    correlation_id: str | None = None
    ignore_result: bool | None = None
    sender_ignore_result: bool = False
    called_directly: bool = True
    callbacks: list | None = None
    errbacks: list | None = None
    chain: list | None = None
    timelimit: tuple = (None, None)
    options: dict = {}
    #: Headers added by before_task_publish receivers on the sending side (None when none).
    headers: dict | None = None
    recorder: Recorder | None = None
    retry_dispatcher: Any = None
    #: ``retry(max_retries=N)`` in this call: the limit its automatic retry applies (this call only).
    override_max_retries: int | None = None
    #: Set by ``Task.__call__`` when a custom ``__call__`` calls ``super()`` inside a traced run (unset otherwise).
    _entered: bool

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Context:
        """Return a Context whose fields are ``fields`` itself (the dict is taken, not copied).

        The worker builds one per task run: taking a ready dict skips packing and
        copying keyword arguments.
        """
        context = cls.__new__(cls)
        context.__dict__ = fields
        return context

    def update(self, **fields: Any) -> None:
        """Set several fields at once."""
        self.__dict__.update(fields)

    def get(self, name: str, default: Any = None) -> Any:
        """Return a field, or ``default`` when it is unset."""
        return getattr(self, name, default)

    def as_dict(self) -> dict[str, Any]:
        """Return the fields set on this request."""
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"<Context id={self.id!r} task={self.task!r} retries={self.retries}>"


_EMPTY = Context()


class _Stack(threading.local):
    def __init__(self) -> None:
        self.items: list[tuple[Task, Context]] = []


_stack = _Stack()


def push(task: Task, request: Context) -> None:
    """Make ``task`` with ``request`` the running task of this thread."""
    _stack.items.append((task, request))


def pop() -> None:
    """End the innermost running task of this thread."""
    _stack.items.pop()


def running() -> list[tuple[Task, Context]]:
    """This thread's stack of running ``(task, request)`` pairs, innermost last (the tracer's push and pop)."""
    return _stack.items


def current() -> tuple[Task, Context] | None:
    """Return ``(task, request)`` of the innermost running task, or None."""
    items = _stack.items
    return items[-1] if items else None


def current_task() -> Task | None:
    """Return the task running in this thread, or None."""
    items = _stack.items
    return items[-1][0] if items else None


def request_of(task: Task) -> Context:
    """Return the request of ``task`` if it is running in this thread, else an empty one."""
    for running, request in reversed(_stack.items):
        if running is task:
            return request
    return _EMPTY
