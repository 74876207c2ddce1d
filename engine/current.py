"""The current app and the running task, as Celery code expects them.

Celery code reaches its app without holding it: ``AsyncResult(id)``,
``signature("proj.add")``, ``current_app.conf``, ``@shared_task`` in a
reusable package, ``current_task.request``. Here the current app is the one
set with :func:`set_current_app` (``app.set_current()``), else the last
:class:`~engine.Engine` created, else a default app made on first use
(``Engine("default")``, with the default settings).

``shared_task`` tasks belong to no app: each is registered with every app
(existing and future ones), and calling one (``add.delay(2, 2)``) uses the
app that is current at that moment.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from engine import context

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.task import Task

__all__ = ("Proxy", "current_app", "current_task", "get_current_app", "set_current_app", "shared_task")

_lock = threading.Lock()
_current: Engine | None = None
_default: Engine | None = None
_apps: weakref.WeakSet[Engine] = weakref.WeakSet()
#: ``shared_task`` definitions: (function, options), registered with every app.
_shared: list[tuple[Callable[..., Any], dict[str, Any]]] = []


def get_current_app() -> Engine:
    """The current app: the one set current, else the last created, else the default app."""
    global _default
    app = _current
    if app is not None:
        return app
    with _lock:
        if _current is not None:
            return _current
        if _default is None:
            from engine.app import Engine

            _default = Engine("default", set_as_current=False)
        return _default


def set_current_app(app: Engine) -> None:
    """Make ``app`` the current app of this process."""
    global _current
    _current = app


def app_created(app: Engine, set_as_current: bool) -> None:
    """Called by every new Engine: it gets the shared tasks, and becomes current unless told not to."""
    _apps.add(app)
    register_shared_tasks(app, strict=False)
    if set_as_current:
        set_current_app(app)


def register_shared_tasks(app: Engine, strict: bool = True) -> None:
    """Register every ``shared_task`` with ``app`` (again: the ones it has are kept).

    Not ``strict`` (while the app is being created), a task that cannot be made yet,
    say because the app's ``task_cls`` is wrong, is left for :meth:`Engine.finalize`
    or its first use, which raise the error.
    """
    for fun, options in list(_shared):
        try:
            app._task_from_fun(fun, **options)
        except Exception:
            if strict:
                raise


class Proxy:
    """Stands for the object ``resolve()`` returns at each use (attribute, call, repr)."""

    __slots__ = ("__resolve", "__weakref__")

    def __init__(self, resolve: Callable[[], Any]) -> None:
        object.__setattr__(self, "_Proxy__resolve", resolve)

    def _get_current_object(self) -> Any:
        """The object this proxy stands for now."""
        return self.__resolve()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__resolve(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__resolve(), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__resolve()(*args, **kwargs)

    def __bool__(self) -> bool:
        return bool(self.__resolve())

    def __eq__(self, other: object) -> bool:
        return bool(self.__resolve() == other)

    def __hash__(self) -> int:
        return hash(self.__resolve())

    def __repr__(self) -> str:
        return repr(self.__resolve())


#: The current app (see :func:`get_current_app`).
current_app: Any = Proxy(get_current_app)
#: The task running in this thread, or None (``current_task.request`` inside a task).
current_task: Any = Proxy(context.current_task)


def shared_task(*args: Any, **options: Any) -> Any:
    """``@shared_task`` / ``@shared_task(**options)``: a task of whichever app is current when it is used.

    The function is registered with every app, so a worker of any app that
    imports the module runs it; ``name=`` and the other options are as for
    ``@app.task``.
    """

    def decorate(fun: Callable[..., Any]) -> Any:
        _shared.append((fun, options))
        for app in list(_apps):
            app._task_from_fun(fun, **options)
        name = options.get("name")

        def resolve() -> Task:
            app = get_current_app()
            task_name = name or app.gen_task_name(fun.__name__, fun.__module__)
            task = app.tasks.get(task_name)
            return task if task is not None else app._task_from_fun(fun, **options)

        return Proxy(resolve)

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    if args:
        raise TypeError("shared_task() takes options as keyword arguments only")
    return decorate
