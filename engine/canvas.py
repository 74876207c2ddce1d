"""Signatures and chains: task calls described as data, to run later or elsewhere.

A :class:`Signature` is a dict (``task``, ``args``, ``kwargs``, ``options``,
``immutable``), so it travels in a message as it is. ``add.s(2)`` is a partial
call: arguments given when it is applied are *prepended*, so in a chain each
step's return value becomes the next step's first argument, unless the step is
immutable (``si``). ``sig1 | sig2 | sig3`` builds a :class:`chain`; the worker
sends each next step when the previous one succeeds, and a failing step fails
every later step's result with its exception.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from engine import context, current, states
from engine.exceptions import ChordError
from engine.exceptions import TimeoutError as ResultTimeoutError
from engine.progress import ProgressArg, ResultsProgress
from engine.result import AsyncResult, EagerResult
from engine.utils.ids import new_task_id

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.task import Task

__all__ = ("GroupResult", "Signature", "as_completed", "chain", "chord", "chunks", "group", "maybe_signature",
           "signature", "step_dict", "xmap", "xstarmap")

#: First and largest sleep between two bulk reads of :func:`as_completed` (seconds).
POLL_FIRST = 0.0002
POLL_MAX = 0.1

#: The built-in tasks every app registers (Celery's ``celery.map`` and ``celery.starmap``).
MAP_TASK = "engine.map"
STARMAP_TASK = "engine.starmap"


class Signature(dict):
    """One task call: its name, (partial) arguments and sending options."""

    def __init__(self, task: str | Task, args: Any = None, kwargs: dict | None = None, options: dict | None = None,
                 *, immutable: bool = False, app: Engine | None = None) -> None:
        if isinstance(task, str):
            name = task
        else:
            name = task.name
            if app is None:
                app = task.app
        # Item by item rather than dict's keyword constructor: a batch makes one per task.
        self["task"] = name
        self["args"] = list(args) if args else []
        self["kwargs"] = dict(kwargs) if kwargs else {}
        self["options"] = dict(options) if options else {}
        self["immutable"] = bool(immutable)
        self._app = app

    # dict keys read as attributes, as in Celery.
    task = property(lambda self: self["task"], doc="The task name.")
    args = property(lambda self: tuple(self["args"]), doc="Positional arguments.")
    kwargs = property(lambda self: self["kwargs"], doc="Keyword arguments.")
    options = property(lambda self: self["options"], doc="apply_async options.")
    immutable = property(lambda self: self["immutable"], doc="True: arguments given later are ignored.")

    @property
    def app(self) -> Engine:
        """The app whose registry resolves the task name: the task's, else the current app."""
        if self._app is None:
            self._app = current.get_current_app()
        return self._app

    @property
    def type(self) -> Task:
        """The registered task this signature calls."""
        return self.app.tasks.lookup(self.task)

    @property
    def id(self) -> str | None:
        """The task id this call will have, once frozen."""
        task_id: str | None = self.options.get("task_id")
        return task_id

    def _merge(self, args: Any = (), kwargs: dict | None = None, options: dict | None = None
               ) -> tuple[tuple, dict, dict]:
        if self.immutable:
            return self.args, dict(self.kwargs), {**self.options, **(options or {})}
        return (tuple(args or ()) + self.args, {**self.kwargs, **(kwargs or {})},
                {**self.options, **(options or {})})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task body here, directly."""
        call_args, call_kwargs, _ = self._merge(args, kwargs)
        return self.type(*call_args, **call_kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send the call, with extra (prepended) arguments."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Send the call: ``args`` are prepended (unless immutable); options override the signature's.

        A task whose code is not in this process is sent by name (``app.send_task``).
        """
        call_args, call_kwargs, call_options = self._merge(args, kwargs, options)
        task = self.app.tasks.get(self.task)
        if task is None:
            return self.app.send_task(self.task, call_args, call_kwargs, **call_options)
        return task.apply_async(call_args, call_kwargs, **call_options)

    def apply(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Run the call here, eagerly, and return its EagerResult."""
        call_args, call_kwargs, call_options = self._merge(args, kwargs, options)
        for key in ("countdown", "eta", "expires", "queue"):
            call_options.pop(key, None)
        return self.type.apply(call_args, call_kwargs, **call_options)

    def clone(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Signature:
        """Return a copy with extra arguments and options merged in."""
        call_args, call_kwargs, call_options = self._merge(args, kwargs, options)
        return Signature(self.task, call_args, call_kwargs, call_options, immutable=self.immutable, app=self._app)

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set options (and immutability) in place; returns the signature."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self["options"].update(options)
        return self

    def freeze(self, task_id: str | None = None) -> Any:
        """Give the call its task id now (if it has none) and return its AsyncResult."""
        options = self["options"]
        if task_id is not None or "task_id" not in options:
            options["task_id"] = task_id or new_task_id()
        return self.app.AsyncResult(options["task_id"], task_name=self.task)

    def link(self, callback: Signature) -> Signature:
        """Send ``callback`` with this call's result when it succeeds."""
        self["options"].setdefault("link", []).append(dict(callback))
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` when this call fails.

        An errback task whose function takes ``(request, exc, traceback)`` is called
        in the worker at once, as in Celery; one that takes ``(task_id)`` is sent
        as a task.
        """
        self["options"].setdefault("link_error", []).append(dict(errback))
        return errback

    def on_error(self, errback: Signature) -> Signature:
        """:meth:`link_error` that returns this signature, to chain on: ``add.s(2, 2).on_error(log.s()).delay()``."""
        self.link_error(errback)
        return self

    # Not dict's merge: sig | sig is a chain. Celery overrides dict.__or__ the same way.
    def __or__(self, other: Any) -> chain:  # type: ignore[override]
        if isinstance(other, chain):
            return chain(self, *other.tasks, app=self._app)
        if isinstance(other, (Signature, group, chord)):
            return chain(self, other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        args = ", ".join([*(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    def __reduce__(self) -> Any:
        return (_rebuild, (dict(self),))


def _rebuild(data: dict) -> Signature:
    sig: Signature = maybe_signature(data)  # a plain dict always becomes a Signature
    return sig


def maybe_signature(data: Any, app: Engine | None = None) -> Any:
    """Return ``data`` as a Signature, group or chord (a plain dict from a message becomes one); None stays None.

    A dict with ``subtask_type`` ``"group"`` or ``"chord"`` (Celery's form, as a
    chain carries them: see :func:`step_dict`) becomes a group or a chord.
    """
    if data is None or (isinstance(data, Signature) and (app is None or data._app is app)):
        return data
    if isinstance(data, (chain, group, chord)):
        return data
    kind = data.get("subtask_type")
    if kind == "chain":
        return chain([maybe_signature(task, app) for task in data["kwargs"]["tasks"]], app=app)
    if kind == "group":
        return group([maybe_signature(task, app) for task in data["kwargs"]["tasks"]], app=app)
    if kind == "chord":
        header = group([maybe_signature(task, app) for task in data["kwargs"]["header"]], app=app)
        return chord(header, maybe_signature(data["kwargs"]["body"], app), app=app)
    sig = Signature(data["task"], data.get("args"), data.get("kwargs"), data.get("options"),
                    immutable=data.get("immutable", False), app=app if app is not None else getattr(data, "_app", None))
    return sig


def step_dict(step: Any) -> dict:
    """A chain step as a message carries it: a signature's dict, or Celery's dict form of a group or chord."""
    if isinstance(step, group):
        return {"task": "group", "subtask_type": "group", "args": [],
                "kwargs": {"tasks": [step_dict(t) for t in step.tasks]}, "options": {}, "immutable": False}
    if isinstance(step, chord):
        return {"task": "chord", "subtask_type": "chord", "args": [],
                "kwargs": {"header": [step_dict(t) for t in step.header.tasks], "body": dict(step.body or {})},
                "options": {}, "immutable": False}
    if isinstance(step, chain):
        return {"task": "chain", "subtask_type": "chain", "args": [],
                "kwargs": {"tasks": [step_dict(t) for t in step.tasks]}, "options": {}, "immutable": False}
    return dict(step)


def signature(task: str | Task, args: Any = None, kwargs: dict | None = None, *, app: Engine | None = None,
              **options: Any) -> Signature:
    """Build a signature from a task or a task name (a name needs ``app``)."""
    return Signature(task, args, kwargs, options, app=app)


class chain:
    """Steps run one after another, each step's result prepended to the next step's arguments.

    Calling or ``apply_async()`` returns the result of the last step; its
    ``parent`` links lead back to the first. As in Celery, a step may be a
    group (each member gets the previous result; the next step gets the list of
    the group's results, so a group followed by a task becomes a chord) or a
    chord (its header tasks get the previous result; the step after it gets the
    body's result).
    """

    def __init__(self, *tasks: Any, app: Engine | None = None) -> None:
        flat: list[Any] = []
        steps = tasks[0] if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain, group, chord)) else tasks
        for task in steps:
            flat.extend(task.tasks if isinstance(task, chain) else [maybe_signature(task)])
        if not flat:
            raise ValueError("a chain needs at least one signature")
        self.tasks: list[Any] = []
        for step in flat:
            step = step.clone()
            if self.tasks and isinstance(self.tasks[-1], group):
                if not isinstance(step, Signature):
                    raise ValueError(f"a group in a chain may be followed by a task signature only, not {step!r}")
                step = chord(self.tasks.pop(), step, app=app)  # Celery's upgrade: group | task is a chord
            self.tasks.append(step)
        self._app = app or flat[0]._app

    @property
    def app(self) -> Engine:
        """The app of the chain's first step, else the current app."""
        if self._app is None:
            self._app = current.get_current_app()
        return self._app

    def __or__(self, other: Any) -> chain:
        if isinstance(other, (Signature, chain, group, chord)):
            return chain(self, other, app=self._app)
        return NotImplemented

    def clone(self) -> chain:
        """A copy whose steps can be changed (frozen, given options) without touching these."""
        return chain(*self.tasks, app=self._app)

    def freeze(self) -> Any:
        """Give every step its task id now; return the last step's result (the chain's)."""
        return self._freeze()[-1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Send the chain (as Celery's chain call does)."""
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send the chain with extra arguments for its first step."""
        return self.apply_async(args, kwargs)

    def _freeze(self) -> list[Any]:
        results = []
        parent = None
        for step in self.tasks:
            result = step.freeze()
            result.parent = parent
            parent = result
            results.append(result)
        return results

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Send the first step, carrying the rest; return the last step's AsyncResult."""
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        results = self._freeze()
        first, rest = self.tasks[0], self.tasks[1:]
        chord_id = options.pop("chord", None) if rest else None
        if chord_id is not None and isinstance(rest[-1], Signature):
            # A chain in a chord's header: its last step is the header task the chord counts.
            rest[-1].set(chord=chord_id, ignore_result=False)
        # The message carries the remaining steps reversed, so each hop pops the next one; steps
        # given to this chain (it is a step or member of another) run after its own.
        following = list(options.pop("chain", None) or ())
        carried = following + [step_dict(step) for step in reversed(rest)]
        first.apply_async(args, kwargs, chain=carried or None, **options)
        return results[-1]

    def apply(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Run every step here, in order; stop at the first failure (which the result then holds)."""
        self._freeze()
        result: Any = None  # the EagerResult (GroupResult for a group) of the last step run
        value: Any = None
        for index, step in enumerate(self.tasks):
            result = step.apply(args, kwargs, **options) if index == 0 else step.apply((value,))
            if isinstance(result, GroupResult):
                if not result.successful():
                    break
                value = [member.result for member in result.results]
            elif result.state != states.SUCCESS:
                break
            else:
                value = result.result
        return result

    def __iter__(self) -> Iterable[Any]:
        return iter(self.tasks)

    def __repr__(self) -> str:
        return " | ".join(repr(step) for step in self.tasks)


class group:
    """Signatures sent together to run in parallel; the result reads as a list.

    ``group(add.s(i, i) for i in range(10))()`` returns a :class:`GroupResult`
    whose ``get()`` is the list of results in the group's order; ``group | task``
    is a :class:`chord`.

    A group made from an iterator (a generator of signatures) is not turned
    into a list up front: ``apply_async()`` sends each member as the iterator
    yields it, so a million signatures never exist at once. Such a group can be
    sent once; reading :attr:`tasks` first (``len()``, ``repr()``, a chord or a
    chain of it) makes it a list that can be sent again.
    """

    def __init__(self, *tasks: Any, app: Engine | None = None) -> None:
        self._app = app
        self._pending: Iterator[Any] | None = None
        self._tasks: list[Signature] | None = None
        if len(tasks) == 1 and isinstance(tasks[0], Iterator):
            source = tasks[0]
            first = next(source, None)
            if first is not None:
                first = maybe_signature(first, app)
                self._pending = itertools.chain([first], source)
                self._app = app or first._app
            else:
                self._tasks = []
            return
        items = list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Signature) else list(tasks)
        self._tasks = [maybe_signature(task, app).clone() for task in items]
        self._app = app or (self._tasks[0]._app if self._tasks else None)

    @property
    def tasks(self) -> list[Signature]:
        """The members, in order (a group made from an iterator takes all of it now)."""
        if self._tasks is None:
            self._tasks = [maybe_signature(task, self._app).clone() for task in self._take_pending()]
        return self._tasks

    def _take_pending(self) -> Iterator[Any]:
        if self._pending is None:
            raise RuntimeError("this group was made from an iterator that its first apply_async() used up; "
                               "make it from a list to send it again")
        pending, self._pending = self._pending, None
        return pending

    def clone(self) -> group:
        """A copy whose members can be changed without touching these."""
        return group(self.tasks, app=self._app)

    def freeze(self) -> GroupResult:
        """Give every member its task id now; return their GroupResult."""
        return GroupResult([task.freeze() for task in self.tasks])

    @property
    def app(self) -> Engine:
        """The app of the group's first signature, else the current app."""
        if self._app is None:
            self._app = current.get_current_app()
        return self._app

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send every member (with ``args`` prepended to each)."""
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send every member with extra arguments."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> GroupResult:
        """Send every member now; return their results as one GroupResult.

        What every member shares (the options, where results go) is settled
        once; each member then costs building and queueing its message only.
        """
        app = self.app
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        members = iter(self._tasks) if self._tasks is not None else self._take_pending()
        if options.get("reply_to") is None:
            options["reply_to"] = app.reply_address()
        send = _MemberSender(app, tuple(args or ()), dict(kwargs or {}), options, self._app)
        return GroupResult([send(member) for member in members])

    def apply(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> GroupResult:
        """Run every member here, one after another."""
        return GroupResult([task.apply(args, kwargs, **options) for task in self.tasks])

    def __len__(self) -> int:
        return len(self.tasks)

    def __or__(self, body: Any) -> Any:
        """``group | task``: a chord whose body gets the group's results (``group | chain``: a chain)."""
        if isinstance(body, chain):
            return chain(self, body, app=self._app)
        return chord(self, body, app=self._app)

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"


class _MemberSender:
    """Sends group members: a plain member of a registered task goes straight to ``Task._send``.

    When the group adds no arguments and no options but where results go, such a
    member goes to the client's one-step send (``engine.core.PlainSender``) itself.
    """

    def __init__(self, app: Engine, args: tuple, kwargs: dict, options: dict, group_app: Engine | None = None) -> None:
        from engine import task

        self.app = app
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.group_app = group_app  # what maybe_signature() resolves the members with
        self._fast: dict[str, Any] = {}  # task name -> the task when its sending is not customised, else None
        plain = not args and not kwargs and len(options) == 1 and "reply_to" in options
        self._plain_sender = task._plain_sender if plain else None

    def __call__(self, member: Any) -> Any:
        group_app = self.group_app
        if not (isinstance(member, Signature) and (group_app is None or member._app is group_app)):
            member = maybe_signature(member, group_app)
        if not isinstance(member, Signature):  # a chain, group or chord as a member
            return member.apply_async(self.args, self.kwargs, **self.options)
        name = member["task"]
        task = self._fast.get(name, _UNSEEN)
        if task is _UNSEEN:
            from engine.task import Task

            task = self.app.tasks.get(name)
            if task is not None and type(task).apply_async is not Task.apply_async:
                task = None  # a custom apply_async: called as such
            self._fast[name] = task
        if task is None or member["options"] or member["immutable"]:
            return member.apply_async(self.args, self.kwargs, **self.options)
        if self._plain_sender is not None and not member["kwargs"]:
            sent = self._plain_sender.send(task, tuple(member["args"]), self.options["reply_to"])
            if sent is not None:
                return sent
        args = self.args + tuple(member["args"]) if self.args else tuple(member["args"])
        kwargs = {**member["kwargs"], **self.kwargs} if self.kwargs else dict(member["kwargs"])
        return task._send(args, kwargs, self.options)


_UNSEEN = object()


class chord:
    """A group (the header) whose results, in order, go to one task (the body) once all are final.

    ``chord(add.s(i, i) for i in range(10))(tsum.s())`` or ``(group(...) |
    tsum.s()).apply_async()`` returns the body's AsyncResult. There is no
    polling task (Celery's ``chord_unlock``): the results store counts the
    header tasks as their final states are written, and the worker whose write
    completes the count sends the body, once per chord as far as the store can
    tell (a flag set atomically with the last count). A failed header task fails
    the chord with :class:`~engine.exceptions.ChordError` naming it, and the body
    does not run. Needs a result backend shared by the workers (``sqlite://``,
    ``redis://``); eager mode runs it in place.
    """

    def __init__(self, header: Any, body: Any = None, app: Engine | None = None) -> None:
        self.header = header if isinstance(header, group) else group(header, app=app)
        self.body = maybe_signature(body) if body is not None else None
        self._app = app or self.header._app or (self.body._app if self.body is not None else None)

    @property
    def app(self) -> Engine:
        """The app of the header, else the body's, else the current app."""
        if self._app is None:
            self._app = current.get_current_app()
        return self._app

    def clone(self) -> chord:
        """A copy whose header and body can be changed without touching these."""
        return chord(self.header.clone(), self.body.clone() if self.body is not None else None, app=self._app)

    def freeze(self) -> AsyncResult:
        """Give the header tasks and the body their ids now; return the body's AsyncResult (the chord's)."""
        if self.body is None:
            raise TypeError("a chord needs a body: chord(header)(body) or chord(header, body)")
        self.header.freeze()
        result: AsyncResult = self.body.freeze()
        return result

    def __or__(self, other: Any) -> chain:
        """``chord | task``: a chain whose next step gets the body's result."""
        if isinstance(other, (Signature, chain, group, chord)):
            return chain(self, other, app=self._app)
        return NotImplemented

    def __call__(self, body: Any = None, **options: Any) -> AsyncResult:
        """``chord(header)(body)``: send it (with ``body`` when given here)."""
        if body is not None:
            self.body = maybe_signature(body)
        return self.apply_async(**options)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> AsyncResult:
        """Send the header tasks, each carrying the chord's id; return the body's AsyncResult.

        ``chain`` (the steps after the chord, in a chain) goes with the body;
        the other options go to every header task.
        """
        if self.body is None:
            raise TypeError("a chord needs a body: chord(header)(body) or chord(header, body)")
        app = self.app
        body = self.body.clone()
        following = options.pop("chain", None)
        if following:
            body.set(chain=following)
        result: AsyncResult = body.freeze()
        header = [task.clone() for task in self.header.tasks]
        ids = [task.freeze().id for task in header]
        if app.conf.task_always_eager:
            return self._apply_eagerly(header, body, args, kwargs, options)
        backend = app.backend
        if not getattr(backend, "supports_chords", False):
            raise NotImplementedError(f"a chord needs a result backend the workers share (sqlite:// or redis://); "
                                      f"{backend!r} does not keep what its body waits for")
        backend.chord_start(result.id, ids, dict(body))
        if not header:  # nothing to wait for: the body runs at once, with no results
            body.apply_async(([],))
            return result
        # A header task's result is what the body gets: stored even for a task that ignores its results.
        options = {**options, "ignore_result": False}
        for task in header:
            task.apply_async(args, kwargs, chord=result.id, **options)
        return result

    def apply(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> AsyncResult:
        """Run the header tasks here, then the body with their results; return the body's EagerResult."""
        if self.body is None:
            raise TypeError("a chord needs a body: chord(header)(body) or chord(header, body)")
        body = self.body.clone()
        body.freeze()
        options.pop("chain", None)
        return self._apply_eagerly([task.clone() for task in self.header.tasks], body, args, kwargs, options)

    def _apply_eagerly(self, header: list[Signature], body: Signature, args: Any, kwargs: dict | None,
                       options: dict) -> AsyncResult:
        values = []
        for task in header:
            outcome = task.apply(args, kwargs, **options)
            if outcome.state != states.SUCCESS:
                error = ChordError(f"Dependency {outcome.id} raised {outcome.result!r}")
                return EagerResult(body.id or "", error, states.FAILURE, name=body.task, app=self.app)
            values.append(outcome.result)
        done: AsyncResult = body.apply((values,))
        return done

    delay = __call__

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


def xmap(task: Signature, it: Iterable[Any]) -> Signature:
    """One task message that calls ``task`` on each item of ``it`` in one worker: ``[task(x) for x in it]``."""
    task = maybe_signature(task)
    return Signature(MAP_TASK, (), {"task": dict(task), "it": list(it)}, app=task._app)


def xstarmap(task: Signature, it: Iterable[Any]) -> Signature:
    """One task message that calls ``task`` with each item of ``it`` as arguments: ``[task(*x) for x in it]``."""
    task = maybe_signature(task)
    return Signature(STARMAP_TASK, (), {"task": dict(task), "it": [list(args) for args in it]}, app=task._app)


class chunks:
    """``it`` split into parts of ``n`` argument tuples, each part one :func:`xstarmap` task (Celery's chunks).

    ``add.chunks(zip(range(100), range(100)), 10)()`` sends 10 tasks and returns
    a GroupResult whose ``get()`` is a list of 10 lists of 10 results.
    """

    def __init__(self, task: Signature, it: Iterable[Any], n: int) -> None:
        if n < 1:
            raise ValueError(f"chunks need n >= 1, got {n}")
        self.task = maybe_signature(task)
        self.it = it
        self.n = int(n)

    def group(self) -> group:
        """The group of starmap tasks, one per chunk."""
        parts: list[Signature] = []
        part: list[Any] = []
        for args in self.it:
            part.append(args)
            if len(part) == self.n:
                parts.append(xstarmap(self.task, part))
                part = []
        if part:
            parts.append(xstarmap(self.task, part))
        return group(parts, app=self.task._app)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> GroupResult:
        """Send every chunk; return their results as one GroupResult of lists."""
        return self.group().apply_async(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        return self.apply_async(args, kwargs)

    delay = __call__


def _ids_by_backend(results: Iterable[AsyncResult]) -> list[tuple[Any, list[str]]]:
    """The ids of ``results`` grouped by the backend they are read from (EagerResults are known: skipped)."""
    groups: dict[int, tuple[Any, list[str]]] = {}
    # A group's members share their app, so its backend is asked once per app, not once per member.
    by_app: dict[int, Any] = {}
    for result in results:
        if isinstance(result, EagerResult):
            continue
        backend: Any
        if type(result) is not AsyncResult:  # a subclass may read its backend its own way
            backend = result.backend
        elif (backend := result._backend) is None:
            app = result.app
            backend = by_app.get(id(app)) if app is not None else None
            if backend is None:
                backend = result.backend
                by_app[id(result.app)] = backend
        group = groups.get(id(backend))
        if group is None:
            group = groups[id(backend)] = (backend, [])
        group[1].append(result.id)
    return list(groups.values())


def _read_many(results: Iterable[AsyncResult]) -> dict[str, Any]:
    """The stored records (results still encoded) of those of ``results`` that have one, in bulk."""
    found: dict[str, Any] = {}
    for backend, ids in _ids_by_backend(results):
        found.update(backend.get_many_encoded(ids))
    return found


def as_completed(results: Iterable[AsyncResult], timeout: float | None = None) -> Iterator[AsyncResult]:
    """Yield each of ``results`` once it is ready (SUCCESS, FAILURE, REVOKED), those that finished first first.

    The states are read in bulk, with a short backoff between reads that starts
    again whenever something finished. Raises ``engine.exceptions.TimeoutError``
    when ``timeout`` (for the whole iteration) passes with results not ready.
    """
    pending = list(results)
    deadline = None if timeout is None else time.monotonic() + timeout
    sleep = POLL_FIRST
    while pending:
        found = _read_many(pending)
        finished = [r for r in pending if isinstance(r, EagerResult)
                    or (r.id in found and found[r.id].state in states.READY_STATES)]
        if finished:
            finished.sort(key=lambda r: found[r.id].timestamp if r.id in found else 0.0)
            done = {id(r) for r in finished}
            pending = [r for r in pending if id(r) not in done]
            yield from finished
            sleep = POLL_FIRST
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise ResultTimeoutError(f"{len(pending)} result(s) were not ready within {timeout}s "
                               f"(the first: task {pending[0].id})")
        pause = sleep if deadline is None else min(sleep, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        sleep = min(sleep * 1.5, POLL_MAX)


def run_map(app: Engine, task: dict, it: list, star: bool) -> list:
    """Body of the built-in map tasks: call ``task`` (a signature) here on each item, in order."""
    sig = maybe_signature(task, app=app)
    return [sig(*item) if star else sig(item) for item in it]


class GroupResult:
    """The results of a group's members, in order."""

    def __init__(self, results: list, parent: Any = None) -> None:
        self.results = results
        #: The result of the chain step before this group (None outside a chain).
        self.parent = parent

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True, progress: ProgressArg = False) -> list:
        """Wait for every member and return their results in order (``timeout`` bounds the whole wait).

        The members' states are read in bulk (one query or round trip for many
        ids); with ``propagate`` the first failed member, in order, raises.
        ``progress=True`` shows a progress bar (count, rate, time left) on a
        terminal's stderr, nothing elsewhere; a callable is called as
        ``progress(done, total)`` as members finish (see :mod:`engine.progress`).
        """
        if disable_sync_subtasks and context.current_task() is not None:
            raise RuntimeError("Never call result.get() within a task: it can deadlock the worker's children; "
                               "use a chord or pass disable_sync_subtasks=False")
        deadline = None if timeout is None else time.monotonic() + timeout
        records: dict[str, Any] = {}
        by_backend = _ids_by_backend(self.results)
        eager = sum(1 for r in self.results if isinstance(r, EagerResult))
        # Counted as the backends count them: a member listed twice finishes once.
        total = eager + sum(len(set(ids)) for _, ids in by_backend)
        with ResultsProgress(total, progress) as shown:
            shown.advance(eager)
            for backend, ids in by_backend:  # one backend, nearly always
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                records.update(backend.wait_for_many(ids, timeout=remaining, interval=interval,
                                                     on_ready=shown.advance if progress else None))
        values = []
        for r in self.results:
            if isinstance(r, EagerResult):
                values.append(r.get(propagate=propagate))
                continue
            record = records[r.id]
            # SUCCESS never propagates: only other states need AsyncResult's rule.
            values.append(record.result if record.state == states.SUCCESS
                          else AsyncResult._outcome(record.state, record.result, propagate))
        return values

    join = get

    def iter_ready(self, timeout: float | None = None) -> Iterator[AsyncResult]:
        """Yield the members as they finish, first finished first (see :func:`as_completed`)."""
        return as_completed(self.results, timeout=timeout)

    def _states(self) -> list[str]:
        """Every member's state, read in bulk (PENDING when nothing is stored)."""
        found = _read_many(self.results)
        return [r.state if isinstance(r, EagerResult) else found[r.id].state if r.id in found else states.PENDING
                for r in self.results]

    def ready(self) -> bool:
        """True when every member finished."""
        return all(state in states.READY_STATES for state in self._states())

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(state == states.SUCCESS for state in self._states())

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for state in self._states() if state == states.SUCCESS)

    def revoke(self, terminate: bool = False, signal: str = "SIGKILL", timeout: float = 1.0) -> dict:
        """Revoke every member with one request to each worker (see ``AsyncResult.revoke``)."""
        ids = [r.id for r in self.results if not isinstance(r, EagerResult)]
        if not ids:
            return {}
        app = next(r for r in self.results if not isinstance(r, EagerResult)).app or current.get_current_app()
        replies: dict = app.control.revoke(ids, terminate=terminate, signal=signal, timeout=timeout)
        return replies

    def forget(self) -> None:
        """Forget every member's result (one bulk call per backend)."""
        for backend, ids in _ids_by_backend(self.results):
            backend.forget_many(ids)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)
