"""The Task class: what a call sends, and what a worker runs.

``@app.task`` turns a function into a subclass of the app's base task class
and instantiates it once per process, so a task is "closer to an Actor" than
to a function: attributes set on it (a database connection, a cache) persist
across calls in that process.
"""

from __future__ import annotations

import inspect
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from engine import context, signals, states
from engine.canvas import Signature, chunks, xmap, xstarmap
from engine.core import PlainSender, StateRecorder, TaskMessage, compute_backoff
from engine.exceptions import (
    Ignore,
    ImproperlyConfigured,
    MaxRetriesExceededError,
    Reject,
    Retry,
)
from engine.result import AsyncResult, EagerResult
from engine.routing import route_queue
from engine.utils.ids import new_task_id
from engine.utils.imports import symbol_by_name

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.backends.base import Backend
    from engine.request import Request as RequestType  # in Task's body "Request" is the option

__all__ = ("Task", "new_task_id")

#: ``apply_async`` options that travel in the message but have no parameter of their own.
MESSAGE_OPTIONS = frozenset({"retries", "chain", "chord", "parent_id", "root_id", "reply_to", "time_limit",
                             "soft_time_limit"})


#: The headers before_task_publish receivers see that the message already carries (others travel as
#: ``options["headers"]`` and reach the task as ``request.headers``).
_MESSAGE_HEADERS = ("lang", "task", "id", "root_id", "parent_id", "retries", "eta", "expires", "ignore_result")


def _before_publish(name: str, message: TaskMessage) -> None:
    """Send before_task_publish; keys the receivers added to ``headers`` go with the message."""
    headers = {"lang": "py", "task": name, "id": message.id, "root_id": message.root_id or message.id,
               "parent_id": message.parent_id, "retries": message.retries, "eta": message.eta,
               "expires": message.expires, "ignore_result": message.ignore_result}
    signals.before_task_publish.send(sender=name, body=(message.args, message.kwargs, {}), exchange="",
                                     routing_key=message.queue, headers=headers, properties={}, declare=[],
                                     retry_policy=None)
    extra = {key: value for key, value in headers.items() if key not in _MESSAGE_HEADERS}
    if extra:
        message.options = {**message.options, "headers": {**message.options.get("headers", {}), **extra}}


def _timestamp(value: Any, name: str) -> float | None:
    """Turn a datetime or a unix timestamp into a float timestamp."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a datetime or a unix timestamp, not {type(value).__name__}")


def _as_signature_list(value: Any) -> list | None:
    """Normalise ``link``/``link_error``: one signature or a list of them, as plain dicts."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) for item in items] or None


class Task:
    """A task type. Subclass it for custom base classes (``base=`` or ``task_cls=``).

    Class attributes are the task's options; ``None`` means "use the app's
    setting of the same name" (``task_ignore_result`` and so on).
    """

    # Both None only on a base class, which is never registered or sent: a registered task has both.
    #: The task's registered name.
    name: str = None  # type: ignore[assignment]
    #: The app the task belongs to.
    app: Engine = None  # type: ignore[assignment]
    #: Check call arguments against the function's signature when sending.
    typing: bool = True
    #: Retries allowed before the task fails; None retries forever.
    max_retries: int | None = 3
    #: Seconds before a retry when ``retry()`` is given no countdown or eta.
    default_retry_delay: float = 180
    #: Exceptions that retry the task automatically.
    autoretry_for: tuple = ()
    #: Exceptions that never retry automatically, even if they match ``autoretry_for``.
    dont_autoretry_for: tuple = ()
    #: Keyword arguments of the automatic ``retry()`` call.
    retry_kwargs: dict = {}
    #: Exponential backoff for automatic retries: False, True (factor 1) or a factor in seconds.
    retry_backoff: bool | float = False
    #: Largest backoff delay in seconds.
    retry_backoff_max: float = 600
    #: Pick a random delay between 0 and the backoff delay.
    retry_jitter: bool = True
    #: Store no result (None: the app's ``task_ignore_result``).
    ignore_result: bool | None = None
    #: Acknowledge after running instead of on receipt (None: ``task_acks_late``).
    acks_late: bool | None = None
    #: With acks_late: run again when the child died (None: ``task_reject_on_worker_lost``).
    reject_on_worker_lost: bool | None = None
    #: Store the results of eager runs (``apply()``, ``task_always_eager``) in the result backend
    #: (None: ``task_store_eager_result``).
    store_eager_result: bool | None = None
    #: Record STARTED (None: ``task_track_started``).
    track_started: bool | None = None
    #: Hard and soft time limits in seconds (None: the app's settings).
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: At most this many runs per worker: "100/s", "10/m", "2/h" or a number per second (None: no limit).
    rate_limit: str | float | None = None
    #: The queue the task is sent to (None: routes, then ``task_default_queue``).
    queue: str | None = None
    #: Exceptions that are expected: logged without a traceback.
    throws: tuple = ()
    #: The worker's request class for this task, a class or ``'module:Class'``.
    Request: Any = "engine.request:Request"

    MaxRetriesExceededError = MaxRetriesExceededError

    # Set on a task by its app or on first use (declared for the type checker only).
    #: The task body as written, before ``add_autoretry`` or ``bind`` wrapped it.
    __wrapped__: Callable[..., Any]
    #: ``run`` before ``add_autoretry`` wrapped it.
    _orig_run: Callable[..., Any]
    #: The check of call arguments, made on the first call (per class).
    _arguments_checker: ClassVar[_ArgumentsChecker]

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main if self.app else '?'}>"

    # --- running -----------------------------------------------------------------

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body; ``@app.task`` replaces it with the decorated function."""
        raise NotImplementedError("Tasks must define the run method.")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body in this process, like calling the function."""
        running = context.current()
        if running is not None and running[0] is self and not running[1].called_directly \
                and not running[1].get("_entered"):
            # The tracer already pushed this call's request (a custom __call__ that
            # calls super()): keep it, so self.request.id stays the message's id.
            running[1]._entered = True
            return self.run(*args, **kwargs)
        context.push(self, context.Context(args=args, kwargs=kwargs, called_directly=True))
        try:
            return self.run(*args, **kwargs)
        finally:
            context.pop()

    @property
    def request(self) -> context.Context:
        """The request of the current call of this task (an empty one outside a call)."""
        return context.request_of(self)

    @property
    def backend(self) -> Backend:
        """The app's result backend."""
        return self.app.backend

    @property
    def request_class(self) -> type[RequestType]:
        """The resolved ``Request`` class (resolved again only when ``Request`` changes).

        A ``'module:Class'`` name is looked up once: reloading that module later does not
        change which class this task uses.
        """
        # Every task run needs it: an import lookup per task is a measurable share of a no-op task.
        name = self.Request
        resolved: tuple[Any, type[RequestType]] | None = self.__dict__.get("_request_class")
        if resolved is None or resolved[0] is not name:
            resolved = self.__dict__["_request_class"] = (name, symbol_by_name(name))
        return resolved[1]

    def resolve_option(self, name: str) -> Any:
        """Return the task's option ``name``, or the app's ``task_<name>`` setting when unset."""
        value = getattr(self, name)
        # An attribute read (a setting lives in the Settings' __dict__), not the checked __getitem__:
        # the tracer asks once per task run.
        return value if value is not None else getattr(self.app.conf, f"task_{name}")

    # --- handlers (override in a subclass) ---------------------------------------

    def before_start(self, task_id: str, args: tuple, kwargs: dict) -> None:
        """Called by the worker before the task body runs."""

    def on_success(self, retval: Any, task_id: str, args: tuple, kwargs: dict) -> None:
        """Called by the worker when the task returned ``retval``."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Called by the worker when the task raised ``exc``."""

    def on_retry(self, exc: BaseException | None, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Called by the worker when the task is to be retried."""

    def after_return(self, status: str, retval: Any, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Called after the task returned or failed (not after Retry, Ignore or Reject)."""

    # --- sending -----------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send the task with these arguments; shortcut of :meth:`apply_async`."""
        if not kwargs:  # most calls of a batch: sent in one step when nothing customises them
            sent = _plain_sender.send(self, args)
            if sent is not None:
                return sent
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, *, task_id: str | None = None,
                    countdown: float | None = None, eta: Any = None, expires: Any = None,
                    ignore_result: bool | None = None, queue: str | None = None, link: Any = None,
                    link_error: Any = None, **options: Any) -> Any:
        """Send the task to a worker and return its AsyncResult.

        ``countdown`` (seconds) or ``eta`` (datetime or timestamp) delay the run;
        ``expires`` (seconds from now, or a datetime) revokes the task
        if no worker ran it by then; ``link``/``link_error`` are signatures
        sent after success (with the result as first argument) or failure
        (with the task id). With ``task_always_eager`` the task runs here.
        """
        # Localize: this runs once per task sent; the common call has no options at all.
        if options and not MESSAGE_OPTIONS.issuperset(options):
            unknown = set(options) - MESSAGE_OPTIONS
            raise TypeError(f"apply_async() got unknown options: {', '.join(sorted(unknown))}")
        args = args if type(args) is tuple else tuple(args or ())
        kwargs = dict(kwargs) if kwargs else {}
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=task_id or new_task_id(), link=link, link_error=link_error,
                              ignore_result=ignore_result, **options)
        if options.get("reply_to") is None:
            options["reply_to"] = self.app.reply_address()
        if task_id is not None or countdown is not None or eta is not None or expires is not None \
                or ignore_result is not None or queue is not None or link is not None or link_error is not None:
            options.update(task_id=task_id, countdown=countdown, eta=eta, expires=expires,
                           ignore_result=ignore_result, queue=queue, link=link, link_error=link_error)
        return self._send(args, kwargs, options)

    def _send(self, args: tuple, kwargs: dict, options: dict) -> Any:
        """Check the arguments, build the message, queue it; return its AsyncResult (options checked by the caller)."""
        if not kwargs and len(options) == 1 and "reply_to" in options:  # a group's plain member, or apply_async(args)
            sent = _plain_sender.send(self, args, options["reply_to"])
            if sent is not None:
                return sent
        if self.typing:
            # The common call, positional arguments of a count the body takes, is checked here.
            cls = type(self)
            checker = cls.__dict__.get("_arguments_checker")
            if checker is None or kwargs or not checker.least <= len(args) <= checker.most \
                    or cls.check_arguments is not Task.check_arguments:
                self.check_arguments(args, kwargs)
        if len(options) == 1 and "reply_to" in options:  # a plain call: no keyword packing
            message = self.build_message(args, kwargs, reply_to=options["reply_to"])
        else:
            message = self.build_message(args, kwargs, **options)
        if signals.before_task_publish.receivers:
            _before_publish(self.name, message)
        self.app.send_message(message)
        if signals.after_task_publish.receivers:
            signals.after_task_publish.send(sender=self.name, body=(message.args, message.kwargs, {}), exchange="",
                                            routing_key=message.queue)
        return self.AsyncResult(message.id)

    def build_message(self, args: tuple = (), kwargs: dict | None = None, *, task_id: str | None = None,
                      countdown: float | None = None, eta: Any = None, expires: Any = None,
                      ignore_result: bool | None = None, queue: str | None = None, link: Any = None,
                      link_error: Any = None, retries: int = 0, chain: list | None = None,
                      chord: str | None = None, parent_id: str | None = None, root_id: str | None = None,
                      reply_to: str | None = None,
                      time_limit: float | None = None, soft_time_limit: float | None = None) -> TaskMessage:
        """Build the TaskMessage that :meth:`apply_async` sends."""
        # Localize: every branch below is skipped by a plain delay(), which runs once per task.
        eta_ts = expires_ts = None
        if countdown is not None or eta is not None or expires is not None:
            now = time.time()
            eta_ts = now + countdown if countdown is not None else _timestamp(eta, "eta")
            if isinstance(expires, (int, float)) and not isinstance(expires, bool):
                expires_ts = now + expires  # seconds from now, as in Celery
            else:
                expires_ts = _timestamp(expires, "expires")
        kwargs = kwargs or {}
        conf = self.app.conf
        if queue is None:
            routes = conf.task_routes
            queue = self.queue or (routes and route_queue(routes, self.name, args, kwargs)) \
                or conf.task_default_queue
        options: dict[str, Any] = {}
        if link is not None and (links := _as_signature_list(link)):
            options["link"] = links
        if link_error is not None and (errbacks := _as_signature_list(link_error)):
            options["link_error"] = errbacks
        if chain:
            options["chain"] = [dict(step) for step in chain]
        if chord is not None:  # the id of the chord (its body's) this task is a header task of
            options["chord"] = chord
        if ignore_result is not None:
            options["ignore_result"] = bool(ignore_result)
        if time_limit is None:
            time_limit = self.time_limit
        if time_limit is not None:
            options["time_limit"] = time_limit
        if soft_time_limit is None:
            soft_time_limit = self.soft_time_limit
        if soft_time_limit is not None:
            options["soft_time_limit"] = soft_time_limit
        return TaskMessage(
            task_id or new_task_id(), self.name, args, kwargs, retries=retries, eta=eta_ts, expires=expires_ts,
            queue=queue, reply_to=reply_to, parent_id=parent_id, root_id=root_id,
            # The message carries the resolved choice so the worker need not know the
            # caller's settings; the per-call value, when given, overrides the task's.
            ignore_result=bool(ignore_result if ignore_result is not None else self.ignore_result
                               if self.ignore_result is not None else conf.task_ignore_result),
            options=options,
        )

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """Raise TypeError now if the task body cannot take these arguments."""
        checker = type(self).__dict__.get("_arguments_checker")
        if checker is None:
            checker = type(self)._arguments_checker = _ArgumentsChecker.of(self)
        checker.check(self.name, args, kwargs)

    def apply(self, args: Any = (), kwargs: dict | None = None, task_id: str | None = None, *,
              link: Any = None, link_error: Any = None, retries: int = 0, throw: bool | None = None,
              ignore_result: bool | None = None, **options: Any) -> Any:
        """Run the task here, through the worker's request and tracer, and return an EagerResult.

        Retries run again at once (their countdown is ignored); ``throw``
        (default: ``task_eager_propagates``) re-raises the task's exception, and,
        as in Celery, raises :class:`~engine.exceptions.Retry` after the first run
        of a task that asks to retry (instead of running it again).
        """
        options.pop("countdown", None)
        options.pop("eta", None)
        options.pop("expires", None)
        options.pop("queue", None)
        throw = self.app.conf.task_eager_propagates if throw is None else throw
        message = self.build_message(tuple(args or ()), dict(kwargs or {}), task_id=task_id, link=link,
                                     link_error=link_error, retries=retries, ignore_result=ignore_result,
                                     **options)
        recorder = StateRecorder()
        try:
            while True:
                request = self.request_class(message, self, recorder=recorder, eager=True)
                outcome = request.execute(propagate=bool(throw))
                retry = outcome.retval
                if outcome.state != states.RETRY or not isinstance(retry, Retry) or retry.sig is None:
                    break
                if throw:
                    raise retry
                message = message.copy(retries=message.retries + 1, args=tuple(retry.sig.args),
                                       kwargs=dict(retry.sig.kwargs))
        finally:  # with throw=True the task's exception passes through here
            if recorder.pending and self.resolve_option("store_eager_result"):
                self._store_eager_states(recorder)
        return EagerResult(message.id, outcome.retval, outcome.state,
                           traceback=outcome.einfo.traceback if outcome.einfo else None,
                           name=self.name, app=self.app, recorder=recorder)

    def _store_eager_states(self, recorder: StateRecorder) -> None:
        """``task_store_eager_result``: write what an eager run recorded to the result backend, as a worker would."""
        if not self.app.conf.result_backend:
            return  # as in Celery: no backend, nothing to store
        from engine.core import StateRecord
        from engine.exceptions import EncodeError
        from engine.serialization import dumps

        accept_pickle = bool(self.app.conf.accept_pickle)
        records = []
        for record in recorder.flush():
            try:
                body = dumps(record.result, accept_pickle)
            except EncodeError as exc:  # a worker fails such a task the same way
                records.append(StateRecord(record.task_id, states.FAILURE, dumps(exc), f"EncodeError: {exc}",
                                           record.timestamp))
                continue
            records.append(StateRecord(record.task_id, record.state, body, record.traceback, record.timestamp))
        self.backend.store(records)

    # --- retrying ----------------------------------------------------------------

    def signature_from_request(self, request: context.Context | None = None, args: Any = None,
                               kwargs: dict | None = None, **options: Any) -> Signature:
        """Return a signature that calls this task again as ``request`` did, with changes."""
        request = self.request if request is None else request
        base_options = {
            "task_id": request.id,
            "queue": (request.delivery_info or {}).get("queue"),
            "link": request.callbacks,
            "link_error": request.errbacks,
            "chain": request.chain,
            "chord": (request.options or {}).get("chord"),  # a retried header task still counts for its chord
            "parent_id": request.parent_id,
            "root_id": request.root_id,
            "reply_to": request.reply_to,
            "expires": datetime.fromtimestamp(request.expires) if request.expires else None,
            "ignore_result": request.ignore_result,
            "time_limit": request.timelimit[0],
            "soft_time_limit": request.timelimit[1],
        }
        base_options = {key: value for key, value in base_options.items() if value is not None}
        base_options.update(options)
        return self.signature(request.args if args is None else args,
                              request.kwargs if kwargs is None else kwargs, **base_options)

    def retry(self, args: Any = None, kwargs: dict | None = None, exc: BaseException | None = None,
              throw: bool = True, eta: Any = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Retry:
        """Run this task again later with the same id (``retries + 1``).

        Raises the :class:`Retry` semipredicate (unless ``throw=False``). Past
        ``max_retries`` it raises ``exc`` instead (the task fails with it), or
        MaxRetriesExceededError when no ``exc`` was given.
        """
        request = self.request
        retries = request.retries + 1
        override, max_retries = max_retries, self.max_retries if max_retries is None else max_retries
        if request.called_directly:
            raise exc or Retry("Task can be retried", None)
        if override is not None:
            # This call's own limit, for autoretry when ``exc`` below is one of autoretry_for.
            # It lives on the request, never on the task: the next call must not inherit it.
            request.override_max_retries = override
        if not eta and countdown is None:
            countdown = self.default_retry_delay
        if eta:
            options["eta"] = eta
        else:
            options["countdown"] = countdown
        sig = self.signature_from_request(request, args, kwargs, retries=retries, **options)
        if max_retries is not None and retries > max_retries:
            if exc is not None:
                raise exc
            raise self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{tuple(sig.args)} kwargs:{dict(sig.kwargs)}",
                task_args=tuple(sig.args), task_kwargs=dict(sig.kwargs))
        ret = Retry(exc=exc, when=eta or countdown, is_eager=request.is_eager, sig=sig)
        if not request.is_eager:
            try:
                if request.retry_dispatcher is not None:
                    request.retry_dispatcher(sig)
                else:
                    sig.apply_async()
            except Exception as send_error:
                raise Reject(send_error, requeue=False) from send_error
        if throw:
            raise ret
        return ret

    def backoff_delay(self, retries: int) -> float:
        """The automatic-retry countdown for attempt ``retries`` (see ``retry_backoff``)."""
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        return compute_backoff(retries, factor, float(self.retry_backoff_max), bool(self.retry_jitter))

    # --- state and results ---------------------------------------------------------

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None) -> None:
        """Record a state (often a custom one such as ``'PROGRESS'``) for this or another task."""
        if not states.is_valid_state(state):
            raise ValueError(f"a state must be a non-empty upper-case string, not {state!r}")
        request = self.request
        task_id = request.id if task_id is None else task_id
        if task_id is None:
            raise ValueError("update_state() outside a task call needs a task_id")
        if task_id == request.id and request.recorder is not None:
            request.recorder.record(task_id, state, meta, None)
        else:
            self.backend.store_state(task_id, state, meta)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        """Return the result handle of a call of this task."""
        if kwargs:
            return self.app.AsyncResult(task_id, task_name=self.name, **kwargs)
        return self.app.AsyncResult(task_id, None, self.name)  # once per task sent: no keyword packing

    # --- signatures ----------------------------------------------------------------

    def signature(self, args: Any = None, kwargs: dict | None = None, **options: Any) -> Signature:
        """Return a signature: this task with (partial) arguments and options, to call later."""
        immutable = options.pop("immutable", False)
        return Signature(self.name, args, kwargs, options, immutable=immutable, app=self.app)

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """Shortcut: ``signature(args, kwargs)``."""
        if type(self).signature is not Task.signature:  # a subclass's own signature() is honoured
            return self.signature(args, kwargs)
        return Signature(self.name, args, kwargs, None, app=self.app)  # a batch makes one per task

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """Shortcut for an immutable signature: later steps' results are not prepended."""
        return self.signature(args, kwargs, immutable=True)

    def map(self, it: Any) -> Signature:
        """A signature of one task that calls this one on each item of ``it`` in one worker (Celery's map)."""
        return xmap(self.s(), it)

    def starmap(self, it: Any) -> Signature:
        """Like :meth:`map`, with each item of ``it`` as the arguments (Celery's starmap)."""
        return xstarmap(self.s(), it)

    def chunks(self, it: Any, n: int) -> Any:
        """``it`` (argument tuples) split into parts of ``n``, each part one task (Celery's chunks)."""
        return chunks(self.s(), it, n)


class _ArgumentsChecker:
    """Checks call arguments against a task body's signature, fast for plain positional calls.

    ``inspect.Signature.bind`` costs microseconds per call; a call with only
    positional arguments to a function without ``*args`` needs just a count.
    """

    __slots__ = ("least", "most", "signature")

    def __init__(self, signature: inspect.Signature | None) -> None:
        self.signature = signature
        self.least = self.most = -1
        if signature is None:
            return
        kinds = [p.kind for p in signature.parameters.values()]
        if any(k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY) for k in kinds):
            return  # leave these to bind()
        positional = [p for p in signature.parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.most = len(positional)
        self.least = sum(1 for p in positional if p.default is inspect.Parameter.empty)

    @classmethod
    def of(cls, task: Task) -> _ArgumentsChecker:
        fun = getattr(task, "__wrapped__", None) or task.run
        try:
            signature = inspect.signature(fun)
        except (TypeError, ValueError):
            return cls(None)
        if getattr(task, "_bound", False):
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        return cls(signature)

    def check(self, name: str | None, args: tuple, kwargs: dict) -> None:
        if self.signature is None or (not kwargs and self.least <= len(args) <= self.most):
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None


def add_autoretry(task: Task) -> None:
    """Wrap ``task.run`` so ``autoretry_for`` exceptions call ``retry()`` (with backoff)."""
    autoretry_for = tuple(task.autoretry_for or ())
    if not autoretry_for or "_orig_run" in task.__dict__:
        return
    dont_autoretry_for = tuple(task.dont_autoretry_for or ())
    orig_run: Callable[..., Any] = task.run

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return orig_run(*args, **kwargs)
        except (Ignore, Retry, Reject):
            raise
        except autoretry_for as exc:
            if dont_autoretry_for and isinstance(exc, dont_autoretry_for):
                raise
            retry_kwargs = dict(task.retry_kwargs or {})
            if task.retry_backoff:
                retry_kwargs["countdown"] = task.backoff_delay(task.request.retries)
            override = task.request.override_max_retries  # this call gave retry() its own max_retries
            if override is not None:
                retry_kwargs["max_retries"] = override
            raise task.retry(exc=exc, **retry_kwargs) from exc

    run.__wrapped__ = orig_run  # type: ignore[attr-defined]
    task._orig_run, task.run = orig_run, run  # type: ignore[method-assign]


#: The sending methods a plain call skips: a task class that overrides one sends the general way.
_SENDING_METHODS = ("apply_async", "_send", "build_message", "AsyncResult", "check_arguments")


def _load_transport() -> tuple[dict[str, Any], type, dict[str, Any]]:
    """What a plain call needs of the app and the producer: their sending methods as their modules define them."""
    from engine import app
    from engine.transport import producer

    return app.SENDING_METHODS, producer.Producer, producer.SENDING_METHODS


#: Sends plain calls (see engine.core.PlainSender): ``delay(*args)`` and a group's plain members.
_plain_sender = PlainSender({name: getattr(Task, name) for name in _SENDING_METHODS}, AsyncResult,
                            signals.before_task_publish, signals.after_task_publish, _load_transport)


def validate_options(base: type, options: dict[str, Any]) -> None:
    """Refuse task options that neither Task nor the custom base defines (typos)."""
    unknown = [name for name in options if not hasattr(base, name)]
    if unknown:
        raise ImproperlyConfigured(
            f"unknown task option(s) {', '.join(sorted(unknown))} for base {base.__module__}.{base.__qualname__}")
    if options.get("rate_limit") is not None:
        from engine.worker.rate_limits import parse_rate

        try:
            parse_rate(options["rate_limit"])
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
