"""The app: settings, the task registry, the ``@app.task`` decorator and sending."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from engine.config import Settings
from engine.core import TaskRegistry
from engine.exceptions import DuplicateTaskError, ImproperlyConfigured
from engine.result import AsyncResult
from engine.task import Task, add_autoretry, validate_options
from engine.utils.imports import symbol_by_name

__all__ = ("Engine",)


class Engine:
    """A task app: ``app = Engine('proj', backend='sqlite:///results.db')``.

    ``transport`` is one ZeroMQ endpoint or a list (clients connect, workers
    bind); ``backend`` a result backend URL; ``task_cls`` the default base of
    this app's tasks (a Task subclass or ``'module:Class'``); other keyword
    arguments are settings (see :mod:`engine.config`).
    """

    def __init__(self, main: str | None = None, *, transport: Any = "tcp://127.0.0.1:5555",
                 backend: str | None = None, task_cls: Any = None, **settings: Any) -> None:
        self.main = main
        self.conf = Settings(settings)
        self.conf.transport = transport
        if backend is not None:
            self.conf.result_backend = backend
        self._task_cls = task_cls
        #: The task registry: name -> task instance (the core's compiled mapping).
        self.tasks = TaskRegistry()
        self._backend: Any = None
        self._producer: Any = None

    def __repr__(self) -> str:
        return f"<Engine {self.main or '__main__'}:{id(self):#x}>"

    # --- tasks ---------------------------------------------------------------------

    @property
    def Task(self) -> type:
        """The default base class of this app's tasks (``task_cls``, else :class:`engine.Task`)."""
        base = symbol_by_name(self._task_cls) if self._task_cls is not None else Task
        if not (isinstance(base, type) and issubclass(base, Task)):
            raise ImproperlyConfigured(f"task_cls must be a subclass of engine.Task, not {base!r}")
        return base

    def gen_task_name(self, name: str, module: str) -> str:
        """Name a task that was given no ``name=``: ``module.function``.

        Override in a subclass to change the scheme (e.g. strip ``.tasks``).
        """
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    def task(self, *args: Any, **options: Any) -> Any:
        """Decorator registering a function as a task: ``@app.task`` or ``@app.task(**options)``.

        Options: ``name``, ``bind``, ``base`` and any Task attribute
        (``max_retries``, ``autoretry_for``, ``ignore_result``, ``queue`` ...).
        """
        if len(args) == 1 and not options and callable(args[0]):
            return self._task_from_fun(args[0])
        if args:
            raise TypeError("app.task() takes options as keyword arguments only")

        def decorate(fun: Callable[..., Any]) -> Task:
            return self._task_from_fun(fun, **options)

        return decorate

    def _task_from_fun(self, fun: Callable[..., Any], name: str | None = None, base: Any = None,
                       bind: bool = False, **options: Any) -> Task:
        if not callable(fun):
            raise TypeError(f"@app.task needs a function, got {fun!r}")
        base = symbol_by_name(base) if base is not None else self.Task
        validate_options(base, options)
        name = name or self.gen_task_name(fun.__name__, fun.__module__)
        existing = self.tasks.get(name)
        if existing is not None:
            if _same_function(existing.__wrapped__, fun):
                return existing
            raise DuplicateTaskError(
                f"task name {name!r} is registered twice: by {_describe(existing.__wrapped__)} and by "
                f"{_describe(fun)}; give one of them another name=")
        attrs = {
            "app": self,
            "name": name,
            "run": fun if bind else staticmethod(fun),
            "_bound": bind,
            "__wrapped__": staticmethod(fun),
            "__doc__": fun.__doc__,
            "__module__": fun.__module__,
            "__qualname__": getattr(fun, "__qualname__", fun.__name__),
            **options,
        }
        task = type(fun.__name__, (base,), attrs)()
        add_autoretry(task)
        self.tasks.register(name, task)
        return task

    def register_task(self, task: Task | type) -> Task:
        """Register a task written as a class (a Task subclass with ``run`` and ``name``)."""
        if isinstance(task, type):
            task = task()
        if not task.name:
            raise ImproperlyConfigured(f"{task!r} needs a name to be registered")
        task.app = self
        if "__wrapped__" not in type(task).__dict__:
            type(task).__wrapped__ = staticmethod(task.run)
        add_autoretry(task)
        self.tasks.register(task.name, task)
        return task

    # --- results -------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The result backend of ``conf.result_backend`` (created on first use)."""
        if self._backend is None or self._backend.url != self.conf.result_backend:
            from engine.backends import backend_from_url

            self._backend = backend_from_url(self.conf.result_backend, self)
        return self._backend

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        """Return the result handle of task ``task_id``."""
        return AsyncResult(task_id, app=self, **kwargs)

    # --- sending -------------------------------------------------------------------

    def signature(self, name: str, args: Any = None, kwargs: dict | None = None, **options: Any) -> Any:
        """Return a signature of the task called ``name`` (which need not be imported here)."""
        from engine.canvas import Signature

        return Signature(name, args, kwargs, options, app=self)

    def send_task(self, name: str, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Send a task by name, without its code in this process; returns its AsyncResult."""
        task = self.tasks.get(name)
        if task is None:
            # A placeholder of the default base sends the message; the worker has the code.
            task = type(name.rpartition(".")[2] or name, (self.Task,), {"app": self, "name": name, "typing": False})()
        return task.apply_async(args, kwargs, **options)

    def reply_address(self) -> str | None:
        """The id workers send results to when the backend is ``rpc://`` (None otherwise)."""
        url = self.conf.result_backend
        if not url or not str(url).startswith("rpc"):
            return None
        producer = self.backend.listen()
        return getattr(producer, "client_id", None)

    def send_message(self, message: Any) -> None:
        """Hand an encoded task message to the transport (see engine.transport)."""
        self.producer.send(message)

    @property
    def producer(self) -> Any:
        """This process's connection to the workers (created on first use, again after fork)."""
        from engine.transport.producer import Producer

        if self._producer is None or not self._producer.usable():
            self._producer = Producer(self)
        return self._producer

    def close(self) -> None:
        """Flush and close the producer and backend."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._backend is not None:
            self._backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _same_function(a: Any, b: Any) -> bool:
    """One function, or the same function defined again (a module imported twice)."""
    a = inspect.unwrap(a)
    b = inspect.unwrap(b)
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", None)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
                      and getattr(a, "__code__", None) is not None
                      and a.__code__.co_filename == b.__code__.co_filename)


def _describe(fun: Any) -> str:
    fun = inspect.unwrap(fun)
    code = getattr(fun, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fun, '__module__', '?')}.{getattr(fun, '__qualname__', repr(fun))}{where}"
