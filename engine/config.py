"""The app's settings: known names, their defaults, and checked access.

``app.conf.NAME`` reads and writes a setting; ``app.conf.update(...)`` sets
several. A name that is not below raises :class:`UnknownSettingError` at once,
so a typo (``task_acks_lat=True``) is an error instead of a silent no-op.
Names are Celery's where Celery has the setting.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from engine.exceptions import UnknownSettingError

__all__ = ("DEFAULTS", "Settings")

#: Every setting the engine knows, with its default.
DEFAULTS: dict[str, Any] = {
    #: ZeroMQ endpoint(s): clients connect to them, workers bind them.
    "transport": "tcp://127.0.0.1:5555",
    #: True: the client binds the transport endpoints and workers connect (ventilator pattern).
    "transport_bind": False,
    #: CURVE (client side): the worker's public key file and this client's secret key file.
    "transport_curve_server_key": None,
    "transport_curve_client_key": None,
    #: Result backend URL (sqlite:///path, rpc://, redis://host:port/db, memory://) or None.
    "result_backend": None,
    #: Seconds a stored result is kept.
    "result_expires": 86400,
    #: Store no results unless a task or a call asks for them.
    "task_ignore_result": False,
    #: Acknowledge a task message after the task ran instead of on receipt.
    "task_acks_late": False,
    #: Re-run (instead of fail) an acks_late task whose child died.
    "task_reject_on_worker_lost": False,
    #: Record STARTED when a child begins a task.
    "task_track_started": False,
    #: Run every ``delay()``/``apply_async()`` in-process, as ``apply()`` does.
    "task_always_eager": False,
    #: With ``task_always_eager``: re-raise task exceptions in the caller.
    "task_eager_propagates": False,
    #: Store results of eagerly run tasks in the backend too.
    "task_store_eager_result": False,
    #: The queue of a task that names none.
    "task_default_queue": "celery",
    #: Routing: dict ``{task name or glob: queue or {'queue': name}}``, or a list of them,
    #: or callables ``(name, args, kwargs, options) -> queue | dict | None``.
    "task_routes": None,
    #: Hard and soft time limits (seconds) for every task, unless the task sets its own.
    "task_time_limit": None,
    "task_soft_time_limit": None,
    #: Serializer for task arguments and results. Only ``msgpack`` is accepted
    #: unless ``accept_pickle`` is true (pickle from the wire runs code: opt in only
    #: on networks you trust).
    "task_serializer": "msgpack",
    "accept_pickle": False,
    #: Tasks a worker child reserves ahead, per child, outside ``--fair``.
    "worker_prefetch_multiplier": 4,
    #: Children per worker (None: CPU count).
    "worker_concurrency": None,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    #: Seconds a client waits for a worker to acknowledge a message before sending it again.
    "transport_ack_timeout": 10.0,
    #: Most messages a client holds (waiting for credit or for an acknowledgement) ...
    "producer_max_outbox": 1_000_000,
    #: ... and what ``delay()`` does when that many are held: "block" until workers take
    #: some, or "raise" OutboxFull at once.
    "producer_outbox_full": "block",
    #: Seconds a client waits at exit for workers to take what it sent (None: until they do).
    "producer_flush_timeout": None,
    #: Target seconds of queued work a worker accepts per child (sizes its credit window).
    "worker_queue_seconds": 0.05,
    #: Largest task message accepted, in bytes.
    "max_message_size": 16 * 1024 * 1024,
}


class Settings:
    """Attribute and mapping access to an app's settings, refusing unknown names.

    Values live in the instance's ``__dict__``, so reading a setting is a plain
    attribute read (it happens on every ``delay()``); only unknown names reach
    ``__getattr__``, which raises.
    """

    def __init__(self, initial: Mapping[str, Any] | None = None, **settings: Any) -> None:
        self.__dict__.update(DEFAULTS)
        self.update(initial or {}, **settings)

    @staticmethod
    def _check(name: str) -> None:
        if name not in DEFAULTS:
            close = [known for known in DEFAULTS if _similar(name, known)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownSettingError(f"unknown setting {name!r}{hint}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._check(name)
        raise AttributeError(name)  # pragma: no cover - every known name is in __dict__

    def __setattr__(self, name: str, value: Any) -> None:
        self._check(name)
        self.__dict__[name] = value

    def __getitem__(self, name: str) -> Any:
        self._check(name)
        return self.__dict__[name]

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in DEFAULTS

    def __iter__(self) -> Iterator[str]:
        return iter(DEFAULTS)

    def get(self, name: str, default: Any = None) -> Any:
        """Return a setting's value, or ``default`` for a name the engine does not know."""
        return self.__dict__.get(name, default) if name in DEFAULTS else default

    def update(self, other: Mapping[str, Any] | None = None, **settings: Any) -> None:
        """Set several settings at once; checks every name before changing any."""
        changes = {**(other or {}), **settings}
        for name in changes:
            self._check(name)
        self.__dict__.update(changes)

    def as_dict(self) -> dict[str, Any]:
        """Return a copy of every setting and its value."""
        return {name: self.__dict__[name] for name in DEFAULTS}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.as_dict().items() if DEFAULTS[k] != v}
        return f"<Settings {changed!r}>"


def _similar(a: str, b: str) -> bool:
    """Cheap typo check: same length ±1 and at most two differing characters."""
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() > 0.85
