"""The app: settings, the task registry, the ``@app.task`` decorator and sending."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from engine import current
from engine.canvas import MAP_TASK, STARMAP_TASK, Signature, run_map
from engine.config import DEFAULTS, Settings
from engine.core import TaskRegistry
from engine.exceptions import CeleryCompatibilityWarning, DuplicateTaskError, ImproperlyConfigured
from engine.result import AsyncResult
from engine.task import Task, add_autoretry, validate_options
from engine.utils.imports import symbol_by_name

if TYPE_CHECKING:
    from engine.backends.base import Backend
    from engine.core import TaskMessage
    from engine.task import Task as TaskType  # inside Engine's body "Task" is the property (the default base)

__all__ = ("Engine",)


class Engine:
    """A task app: ``app = Engine('proj', backend='sqlite:///results.db')``.

    ``transport`` is one ZeroMQ endpoint or a list (clients connect, workers
    bind); ``backend`` a result backend URL; ``task_cls`` the default base of
    this app's tasks (a Task subclass or ``'module:Class'``); ``include``
    modules the worker imports at start (as Celery's); other keyword
    arguments are settings (see :mod:`engine.config`). ``broker`` is accepted
    for Celery code and ignored with a warning: there is no broker here.
    The new app becomes the current app (:mod:`engine.current`) unless
    ``set_as_current=False``.
    """

    def __init__(self, main: str | None = None, *, transport: Any = "tcp://127.0.0.1:5555",
                 backend: str | None = None, task_cls: Any = None, broker: str | None = None,
                 include: Iterable[str] | None = None, set_as_current: bool = True, **settings: Any) -> None:
        self.main = main
        self.conf = Settings(settings)
        self.conf.transport = transport
        if backend is not None:
            self.conf.result_backend = backend
        if broker is not None:
            warnings.warn(
                f"Engine(broker={broker!r}) is ignored: engine has no broker; clients send tasks straight to "
                f"workers over ZeroMQ at the 'transport' endpoint(s) ({transport!r})",
                CeleryCompatibilityWarning, stacklevel=2)
        self._task_cls = task_cls
        #: The task registry: name -> task instance (the core's compiled mapping).
        self.tasks = TaskRegistry()
        self._backend: Backend | None = None
        self._producer: Any = None
        #: The rpc:// reply address and what it holds for: (URL, backend, producer, address).
        self._reply_to: tuple[Any, Any, Any, str | None] | None = None
        self._control: Any = None
        #: Modules to import before a worker starts (``include=``, ``autodiscover_tasks``).
        self._pending_imports: list[Any] = list(include or ())
        self._register_builtins()
        current.app_created(self, set_as_current)

    def _register_builtins(self) -> None:
        """The tasks every app has, as in Celery: the bodies of ``Task.map``, ``starmap`` and ``chunks``."""
        app = self

        def map_each(task: dict, it: list) -> list:
            return run_map(app, task, it, star=False)

        def starmap_each(task: dict, it: list) -> list:
            return run_map(app, task, it, star=True)

        self._task_from_fun(map_each, name=MAP_TASK, base=Task)
        self._task_from_fun(starmap_each, name=STARMAP_TASK, base=Task)

    def __repr__(self) -> str:
        return f"<Engine {self.main or '__main__'}:{id(self):#x}>"

    # --- tasks ---------------------------------------------------------------------

    @property
    def Task(self) -> type[TaskType]:
        """The default base class of this app's tasks (``task_cls``, else :class:`engine.Task`).

        Assignable, as in Celery: ``app.Task = MyTask`` (tasks created afterwards use it).
        """
        base = symbol_by_name(self._task_cls) if self._task_cls is not None else Task
        if not (isinstance(base, type) and issubclass(base, Task)):
            raise ImproperlyConfigured(f"task_cls must be a subclass of engine.Task, not {base!r}")
        return base

    @Task.setter
    def Task(self, base: Any) -> None:
        self._task_cls = base
        self.Task  # noqa: B018 - checks it now, so a wrong class fails here and not at the first task

    def set_current(self) -> None:
        """Make this the current app (what ``current_app``, ``shared_task`` and app-less calls use)."""
        current.set_current_app(self)

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
        if len(args) == 1 and callable(args[0]):  # @app.task, or app.task(fun, name=...) called directly
            return self._task_from_fun(args[0], **options)
        if args:
            raise TypeError("app.task() takes options as keyword arguments only")

        def decorate(fun: Callable[..., Any]) -> TaskType:
            return self._task_from_fun(fun, **options)

        return decorate

    def _task_from_fun(self, fun: Callable[..., Any], name: str | None = None, base: Any = None,
                       bind: bool = False, **options: Any) -> TaskType:
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
        task: TaskType = type(fun.__name__, (base,), attrs)()
        add_autoretry(task)
        self.tasks.register(name, task)
        return task

    def register_task(self, task: TaskType | type[TaskType]) -> TaskType:
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

    # --- configuration -------------------------------------------------------------

    def config_from_object(self, obj: Any, namespace: str | None = None, silent: bool = False) -> None:
        """Read settings from a module (or its dotted path), a class, an object or a mapping.

        As in Celery: without ``namespace`` the lower-case public names are
        settings; with ``namespace="CELERY"`` the names that start with
        ``CELERY_`` are, without the prefix and in lower case (Flask and Django
        style: ``CELERY_TASK_ALWAYS_EAGER`` sets ``task_always_eager``). An
        unknown setting name raises, as everywhere; ``silent=True`` only
        forgives a module path that cannot be imported.
        """
        if isinstance(obj, str):
            try:
                obj = symbol_by_name(obj) if ":" in obj else importlib.import_module(obj)
            except ImportError:
                if silent:
                    return
                raise
        items = obj.items() if isinstance(obj, Mapping) else (
            (name, getattr(obj, name)) for name in dir(obj) if not name.startswith("_"))
        prefix = f"{namespace.upper()}_" if namespace else ""
        settings: dict[str, Any] = {}
        for name, value in items:
            if not isinstance(name, str) or isinstance(value, ModuleType):
                continue
            if prefix:
                if not name.upper().startswith(prefix):
                    continue
                name = name[len(prefix):].lower()
            elif not name.islower():
                continue
            if callable(value) and name not in DEFAULTS:
                continue  # a helper function or class of the config module, not a setting (task_routes may be one)
            settings[name] = value
        self.conf.update(settings)

    def autodiscover_tasks(self, packages: Any = None, related_name: str = "tasks", force: bool = False) -> None:
        """Import ``PACKAGE.tasks`` of each package (a list, or a callable returning one) before the worker starts.

        As in Celery the imports wait until the worker starts (or :meth:`finalize`),
        so a Django project can call this before its apps are ready; ``force=True``
        imports now. A package without a ``tasks`` module is skipped; an error
        inside one is raised.
        """
        self._pending_imports.append((packages, related_name))
        if force:
            self.finalize()

    def finalize(self) -> None:
        """Import the modules of ``include=`` and ``autodiscover_tasks``, register shared tasks (a worker's start)."""
        current.register_shared_tasks(self)
        pending, self._pending_imports = self._pending_imports, []
        for item in pending:
            if isinstance(item, str):
                importlib.import_module(item)
                continue
            packages, related_name = item
            if callable(packages):
                packages = packages()
            for package in packages or ():
                _import_related(package, related_name)

    # --- results -------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The result backend of ``conf.result_backend`` (created on first use)."""
        if self._backend is None or self._backend.url != self.conf.result_backend:
            from engine.backends import backend_from_url

            self._backend = backend_from_url(self.conf.result_backend, self)
        return self._backend

    @property
    def control(self) -> Any:
        """Remote control of running workers: ``app.control.inspect().stats()``, ``.revoke(id)`` (engine.control)."""
        if self._control is None:
            from engine.control import Control

            self._control = Control(self)
        return self._control

    def AsyncResult(self, id: str, backend: Any = None, task_name: str | None = None, app: Any = None,
                    parent: Any = None) -> Any:
        """Return the result handle of task ``id`` (Celery's arguments, in Celery's order)."""
        # Positional: made once per task sent, where keyword packing is a measurable share.
        return AsyncResult(id, backend, task_name, app or self, parent)

    # --- sending -------------------------------------------------------------------

    def signature(self, name: str, args: Any = None, kwargs: dict | None = None, **options: Any) -> Signature:
        """Return a signature of the task called ``name`` (which need not be imported here)."""
        return Signature(name, args, kwargs, options, app=self)

    def send_task(self, name: str, args: Any = None, kwargs: dict | None = None, **options: Any) -> Any:
        """Send a task by name, without its code in this process; returns its AsyncResult.

        ``options`` are ``apply_async``'s (``countdown``, ``queue``, ``task_id`` ...).
        """
        args = args or ()
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
        # Asked on every send: the answer holds while the URL, the backend and the producer do.
        known = self._reply_to
        if known is not None and known[0] == url and known[1] is self._backend and known[2] is self._producer \
                and known[2].usable():
            address: str | None = known[3]
            return address
        producer = self.backend.listen()  # type: ignore[attr-defined]  # an rpc:// URL: an RPCBackend
        address = getattr(producer, "client_id", None)
        self._reply_to = (url, self._backend, producer, address)
        return address

    def send_message(self, message: TaskMessage) -> None:
        """Hand an encoded task message to the transport (see engine.transport)."""
        self.producer.send(message)

    @property
    def producer(self) -> Any:
        """This process's connection to the workers (created on first use, again after fork)."""
        producer = self._producer
        if producer is None or not producer.usable():
            # Imported here, on the rare path: an import statement costs even when cached.
            from engine.transport.producer import Producer

            producer = self._producer = Producer(self)
        return producer

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


#: Engine's methods a task's send goes through, as defined here: an app whose class or self
#: replaces one of them sends the general way (engine.core.PlainSender skips them otherwise).
SENDING_METHODS = {name: Engine.__dict__[name] for name in ("send_message", "AsyncResult", "producer", "reply_address")}


def _import_related(package: str, related_name: str) -> None:
    """Import ``package.related_name``; a package that has no such module is skipped."""
    name = f"{package}.{related_name}" if related_name else package
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # no such package, or its tasks module imports something missing: the user's error


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
