"""The tracer: runs one task call and decides its final state.

Both the worker's children and ``Task.apply()`` run tasks through
:func:`trace_task`, so eager runs behave like worker runs. Order and
conditions follow Celery's tracer:

1. ``before_start``; STARTED is recorded first when ``track_started`` is on
   (not in eager runs).
2. The task runs. Then, by outcome:
   - returned: link callbacks and the next chain step are sent, SUCCESS is
     recorded, ``on_success`` runs;
   - ``Retry``: RETRY is recorded, ``on_retry`` runs;
   - ``Ignore`` / ``Reject``: nothing is recorded (the caller acts on Reject);
   - any other exception: FAILURE is recorded (also for the remaining steps of
     its chain, so the chain's result fails), errbacks are sent, ``on_failure``
     runs.
3. ``after_return`` runs, except after Retry, Ignore and Reject.

States go to a *recorder* (anything with ``record(task_id, state, result,
traceback)``, normally the core's StateRecorder); nothing is recorded when the
task's result is ignored.
"""

from __future__ import annotations

import inspect
import logging
import sys
import traceback as traceback_module
from time import monotonic
from typing import Any, NamedTuple, Protocol

from engine import context, signals, states
from engine.canvas import maybe_signature
from engine.exceptions import EncodeError, Ignore, Reject, Retry
from engine.task import Task
from engine.utils import process
from engine.utils.hostname import HOSTNAME

__all__ = ("ExceptionInfo", "Recorder", "TraceOutcome", "raised", "resolve_ignore_result", "runs_bare", "trace_task")

logger = logging.getLogger("engine.tracer")

#: After these outcomes ``after_return`` is not called (as in Celery).
NO_AFTER_RETURN = frozenset({states.IGNORED, states.RETRY, states.REJECTED})



class ExceptionInfo:
    """An exception with its formatted traceback, as handlers receive it (``einfo``)."""

    __slots__ = ("exception", "internal", "tb", "traceback", "type")

    def __init__(self, exc_info: tuple | None = None, internal: bool = False) -> None:
        etype, exc, tb = exc_info or sys.exc_info()
        self.type = etype
        self.exception = exc
        self.tb = tb
        self.traceback = "".join(traceback_module.format_exception(etype, exc, tb))
        self.internal = internal

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {self.exception!r}>"


class Recorder(Protocol):
    """Where a traced call's states go: the core's StateRecorder (eager runs), a child's pipe to its supervisor."""

    def record(self, task_id: str, state: str, result: Any = None, traceback: str | None = None,
               timestamp: float | None = None) -> bool:
        """Record one state of ``task_id``; False if it was dropped."""


class TraceOutcome(NamedTuple):
    """What one traced call ended as."""

    #: SUCCESS, FAILURE, RETRY, IGNORED or REJECTED.
    state: str
    #: The return value, or the exception (for RETRY: the Retry).
    retval: Any
    #: ExceptionInfo for exception outcomes, else None.
    einfo: ExceptionInfo | None
    #: Seconds the call took.
    runtime: float


def resolve_ignore_result(task: Task, request: context.Context) -> bool:
    """Decide whether a result is stored: the call's choice, else the task's, else the settings.

    The setting counts on either side: the sender's (carried in the message) or this process's.
    """
    if request.ignore_result is not None:
        return bool(request.ignore_result)
    if task.ignore_result is not None:
        return bool(task.ignore_result)
    return bool(request.get("sender_ignore_result")) or bool(task.app.conf.task_ignore_result)


#: The handlers a Task subclass may override that run around every call.
_HANDLERS = ("before_start", "on_success", "after_return")
#: Per task class: the names of _HANDLERS it overrides (the others are Task's empty methods).
_overridden: dict[type, frozenset[str]] = {}


def _handlers(task: Task) -> frozenset[str]:
    """The handlers ``task`` overrides, on its class or on itself: the only ones worth a call."""
    cls = type(task)
    found = _overridden.get(cls)
    if found is None:
        found = _overridden[cls] = frozenset(
            name for name in _HANDLERS if getattr(cls, name) is not getattr(Task, name))
    vars_ = task.__dict__
    if "before_start" in vars_ or "on_success" in vars_ or "after_return" in vars_:  # set on the instance
        found = found | {name for name in _HANDLERS if name in vars_}
    return found


def runs_bare(task: Task) -> bool:
    """True when tracing ``task`` adds nothing around its ``run``: no handler, ``__call__`` or ``track_started``.

    Such a task's successful call records SUCCESS (unless its result is ignored) and
    nothing else, when no task signal is connected and success is not logged.
    """
    return not _handlers(task) and type(task).__call__ is Task.__call__ and not task.resolve_option("track_started")


def trace_task(task: Task, request: context.Context, recorder: Recorder | None = None, *,
               eager: bool = False, propagate: bool = False) -> TraceOutcome:
    """Run ``task`` for ``request`` and record its outcome in ``recorder``.

    ``propagate`` re-raises a task's exception after recording it (eager runs
    with ``throw=True``). Exceptions of the engine itself are not swallowed.
    """
    task_id: str = request.id  # type: ignore[assignment]  # built from a message (Request.context): never None
    args, kwargs = request.args, request.kwargs
    store = None if recorder is None or resolve_ignore_result(task, request) else recorder
    request.recorder = store
    retval: Any = None
    einfo: ExceptionInfo | None = None
    started = monotonic()
    running = context.running()  # this thread's stack, read once: push and pop are a list's own
    running.append((task, request))
    state = states.FAILURE
    # Task's own handlers do nothing: skip their calls (a no-op task pays for every call here).
    handlers = _handlers(task)
    try:
        if signals.task_prerun.receivers:
            signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs)
        if store is not None and not eager and task.resolve_option("track_started"):
            store.record(task_id, states.STARTED, {"pid": process.pid(), "hostname": request.hostname or HOSTNAME})
        try:
            if "before_start" in handlers:
                task.before_start(task_id, args, kwargs)
            # A custom __call__ on a Task subclass must run (Celery honours it); otherwise
            # calling run() directly saves a frame per task.
            retval = (task if type(task).__call__ is not Task.__call__ else task.run)(*args, **kwargs)
            state = states.SUCCESS
        except Exception as exc:
            state, retval, einfo = raised(task, request, store, exc, propagate)
        else:
            try:
                if request.callbacks or request.chain:
                    _send_followers(task, request, retval)
                if store is not None:
                    store.record(task_id, states.SUCCESS, retval)
            except EncodeError as exc:
                # The return value cannot travel: the task fails with a clear error
                # instead of crashing the child or the supervisor.
                state, retval, einfo = _fail(task, task_id, request, store, exc, propagate)
            else:
                if "on_success" in handlers:
                    _call_handler(eager, task, "on_success", retval, task_id, args, kwargs)
                if signals.task_success.receivers:
                    signals.task_success.send(sender=task, result=retval)
                if logger.isEnabledFor(logging.INFO):  # the arguments cost more than the check
                    logger.info("Task %s[%s] succeeded in %.6fs: %.200r", task.name, task_id,
                                monotonic() - started, retval)
        if state not in NO_AFTER_RETURN and "after_return" in handlers:
            _call_handler(eager, task, "after_return", state, retval, task_id, args, kwargs, einfo)
    finally:
        running.pop()
        if signals.task_postrun.receivers:
            signals.task_postrun.send(sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs,
                                      retval=retval, state=state)
    return TraceOutcome(state, retval, einfo, monotonic() - started)


def raised(task: Task, request: context.Context, store: Recorder | None, exc: Exception,
           propagate: bool = False) -> tuple[str, Any, ExceptionInfo | None]:
    """The outcome of a call that raised ``exc``: ``(state, retval, einfo)``, its state recorded in ``store``.

    ``Reject`` and ``Ignore`` record nothing, ``Retry`` records RETRY and calls
    ``on_retry``, any other exception fails the task (see :func:`_fail`).
    Called inside the ``except`` block, so ``ExceptionInfo()`` sees ``exc``;
    :func:`trace_task` and the child's compiled run of plain tasks
    (``engine.core.PlainRunner``) both end here.
    """
    task_id: str = request.id  # type: ignore[assignment]
    if isinstance(exc, Reject):
        logger.info("Task %s[%s] rejected (requeue=%s): %r", task.name, task_id, exc.requeue, exc.reason)
        return states.REJECTED, exc, ExceptionInfo(internal=True)
    if isinstance(exc, Ignore):
        logger.info("Task %s[%s] ignored", task.name, task_id)
        return states.IGNORED, exc, None
    if isinstance(exc, Retry):
        einfo = ExceptionInfo()
        if store is not None:
            store.record(task_id, states.RETRY, exc.exc if exc.exc is not None else exc, einfo.traceback)
        task.on_retry(exc.exc, task_id, request.args, request.kwargs, einfo)
        if signals.task_retry.receivers:
            signals.task_retry.send(sender=task, request=request, reason=exc, einfo=einfo)
        logger.info("Task %s[%s] retry: %s", task.name, task_id, exc)
        return states.RETRY, exc, einfo
    return _fail(task, task_id, request, store, exc, propagate)


def _fail(task: Task, task_id: str, request: context.Context, store: Recorder | None, exc: Exception,
          propagate: bool) -> tuple[str, Exception, ExceptionInfo]:
    """The FAILURE outcome: record it, call ``on_failure``, log; re-raise when propagating.

    Called from inside the ``except`` block, so ``ExceptionInfo()`` sees ``exc``.
    """
    einfo = ExceptionInfo()
    _record_failure(task, task_id, request, store, exc, einfo)
    task.on_failure(exc, task_id, request.args, request.kwargs, einfo)
    if signals.task_failure.receivers:
        signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=request.args,
                                  kwargs=request.kwargs, traceback=einfo.tb, einfo=einfo)
    _log_failure(task, task_id, exc, einfo)
    if propagate:
        raise exc
    return states.FAILURE, exc, einfo


def _call_handler(eager: bool, task: Task, name: str, *args: Any) -> None:
    # The outcome is already recorded: a failing handler must not record a second
    # one. Eager callers (tests) still see the error.
    try:
        getattr(task, name)(*args)
    except Exception:
        if eager:
            raise
        logger.exception("Task %s handler %s raised", task.name, name)


def _record_failure(task: Task, task_id: str, request: context.Context, store: Recorder | None,
                    exc: BaseException, einfo: ExceptionInfo) -> None:
    """Record FAILURE for the task and every later step of its chain, then send errbacks."""
    if store is not None:
        store.record(task_id, states.FAILURE, exc, einfo.traceback)
        for step_id in _chain_step_ids(request.chain or ()):
            store.record(step_id, states.FAILURE, exc, einfo.traceback)
    for errback in request.errbacks or ():
        try:
            sig = _signature(task, errback)
            handler = sig.app.tasks.get(sig.task)
            if handler is not None and _takes_request_exc_traceback(handler):
                # Celery's new-style errback, (request, exc, traceback): called here, at once.
                sig(request, exc, einfo.traceback)
            else:  # old style, (task_id): sent as a task
                sig.apply_async((request.id,), parent_id=request.id, root_id=request.root_id or request.id,
                                reply_to=request.reply_to)
        except Exception:
            logger.exception("Task %s[%s]: errback %r failed", task.name, request.id, errback)


def _chain_step_ids(steps: Any) -> list[str]:
    """The task ids of later chain steps, a group's members and a chord's header and body included."""
    ids: list[str] = []
    for step in steps:
        if not isinstance(step, dict):
            continue
        kind = step.get("subtask_type")
        if kind in ("group", "chain"):
            ids += _chain_step_ids(step.get("kwargs", {}).get("tasks", ()))
        elif kind == "chord":
            kwargs = step.get("kwargs", {})
            ids += _chain_step_ids([*kwargs.get("header", ()), kwargs.get("body")])
        else:
            step_id = (step.get("options") or {}).get("task_id")
            if step_id:
                ids.append(step_id)
            ids += _chain_step_ids((step.get("options") or {}).get("chain") or ())
    return ids


def _takes_request_exc_traceback(handler: Task) -> bool:
    """True when the errback task's function takes more than one positional argument (Celery's test)."""
    try:
        parameters = list(inspect.signature(handler.__wrapped__).parameters.values())
    except (TypeError, ValueError):
        return False
    if getattr(handler, "_bound", False) and parameters:
        parameters = parameters[1:]  # self
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > 1


def _send_followers(task: Task, request: context.Context, retval: Any) -> None:
    """Send the link callbacks and the next chain step with ``retval`` as their first argument."""
    root_id = request.root_id or request.id
    # reply_to travels on, so an rpc:// client gets the results of the steps it started.
    for callback in request.callbacks or ():
        _signature(task, callback).apply_async((retval,), parent_id=request.id, root_id=root_id,
                                               reply_to=request.reply_to)
    if request.chain:
        rest = list(request.chain)
        following = _signature(task, rest.pop())
        following.apply_async((retval,), chain=rest or None, parent_id=request.id, root_id=root_id,
                              reply_to=request.reply_to)


def _signature(task: Task, data: Any) -> Any:
    return maybe_signature(data, app=task.app)


def _log_failure(task: Task, task_id: str, exc: BaseException, einfo: ExceptionInfo) -> None:
    if task.throws and isinstance(exc, task.throws):
        logger.info("Task %s[%s] raised expected: %r", task.name, task_id, exc)
    else:
        logger.error("Task %s[%s] raised unexpected: %r\n%s", task.name, task_id, exc, einfo.traceback)
