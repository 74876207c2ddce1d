"""The app's settings: known names, their defaults, and checked access.

``app.conf.NAME`` reads and writes a setting; ``app.conf.update(...)`` sets
several. A name that is not below raises :class:`UnknownSettingError` at once,
so a typo (``task_acks_lat=True``) is an error instead of a silent no-op; a
value of the wrong type or out of range (``task_serializer="yaml"``) raises
:class:`ImproperlyConfigured` naming the setting, the value and what it takes.
Names are Celery's where Celery has the setting. Celery settings that have
no meaning without a broker (``accept_content``, ``timezone``, ``broker_*``
...: see :data:`CELERY_IGNORED`) are accepted, so a Celery config loads
unchanged, with one :class:`~engine.exceptions.CeleryCompatibilityWarning`
per name saying why it does nothing here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

from engine.exceptions import CeleryCompatibilityWarning, ImproperlyConfigured, UnknownSettingError

__all__ = ("CELERY_IGNORED", "DEFAULTS", "RULES", "Settings")

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
    #: Serializer for task arguments and results: ``"msgpack"`` (values msgpack cannot
    #: pack are refused), or ``"pickle"``, which means ``accept_pickle=True`` (Celery's
    #: name for it): such values are pickled, and pickled values from the wire are
    #: accepted. Pickle from the wire runs code: opt in only on networks you trust.
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
    # dns+tcp://NAME:PORT entries: seconds between two resolutions, and most workers a client links to.
    "transport_dns_refresh": 5.0,
    "transport_max_peers": 64,
    #: Most messages a client holds (waiting for credit or for an acknowledgement) ...
    "producer_max_outbox": 1_000_000,
    #: ... and what ``delay()`` does when that many are held: "block" until workers take
    #: some, or "raise" OutboxFull at once.
    "producer_outbox_full": "block",
    #: Seconds a client waits at exit for workers to take what it sent (None: until they do).
    "producer_flush_timeout": None,
    #: Target seconds of queued work a worker accepts per child (sizes its credit window).
    "worker_queue_seconds": 0.05,
    # --autoscale: seconds a pool stays idle before it shrinks by a child (Celery's AUTOSCALE_KEEPALIVE).
    "worker_autoscale_keepalive": 30.0,
    # As Celery: the worker replaces the root logger's handlers (False: adds its own beside them).
    "worker_hijack_root_logger": True,
    # As Celery's: publish task and worker events (engine-worker -E does the same).
    "worker_send_task_events": False,
    # As Celery's: True runs every task as if it had no rate_limit.
    "worker_disable_rate_limits": False,
    #: None: each worker enforces a task's ``rate_limit`` alone (as Celery). A Redis URL
    #: (redis://, rediss:// or unix://): every worker of the app shares each limit through it.
    "rate_limit_url": None,
    #: Largest task message accepted, in bytes.
    "max_message_size": 16 * 1024 * 1024,
}


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _real(value: Any) -> bool:
    # bool is an int: True must not pass for a number of seconds. value == value refuses NaN.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _positive(value: Any) -> bool:
    return _real(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _real(value) and value >= 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _endpoints(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_text(item) for item in value)
    return _text(value)


def _key_file(value: Any) -> bool:
    return value is None or _text(value) or isinstance(value, os.PathLike)


def _backend_url(value: Any) -> bool:
    from engine.backends import BACKENDS

    return value is None or (_text(value) and (value.partition("://")[0] if "://" in value else value) in BACKENDS)


def _redis_url(value: Any) -> bool:
    if value is None:
        return True
    scheme, sep, rest = value.partition("://") if isinstance(value, str) else ("", "", "")
    # A bare "redis://" is redis-py's localhost:6379 (Celery configs use it); a socket needs its path.
    return bool(sep) and (scheme in ("redis", "rediss") or (scheme == "unix" and bool(rest)))


def _expires(value: Any) -> bool:
    return value is None or _non_negative(value) or isinstance(value, timedelta)


def _routes(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(route, dict) or callable(route) for route in value)
    return value is None or isinstance(value, dict) or callable(value)


#: What each setting accepts: a check, and the words the error uses for it.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "transport": (_endpoints, "a ZeroMQ endpoint string, or a non-empty list of them"),
    "transport_bind": (_flag, "True or False"),
    "transport_curve_server_key": (_key_file, "None or a key file path"),
    "transport_curve_client_key": (_key_file, "None or a key file path"),
    "result_backend": (_backend_url, "None or a URL: sqlite:///path, rpc://, redis://host:port/db or memory://"),
    "result_expires": (_expires, "seconds (>= 0), a timedelta, or 0/None to keep results forever"),
    "task_ignore_result": (_flag, "True or False"),
    "task_acks_late": (_flag, "True or False"),
    "task_reject_on_worker_lost": (_flag, "True or False"),
    "task_track_started": (_flag, "True or False"),
    "task_always_eager": (_flag, "True or False"),
    "task_eager_propagates": (_flag, "True or False"),
    "task_store_eager_result": (_flag, "True or False"),
    "task_default_queue": (_text, "a non-empty queue name"),
    "task_routes": (_routes, "None, a dict, a callable, or a list of dicts and callables"),
    "task_time_limit": (_optional(_positive), "None or seconds (> 0)"),
    "task_soft_time_limit": (_optional(_positive), "None or seconds (> 0)"),
    "task_serializer": (_one_of("msgpack", "pickle"), "'msgpack' or 'pickle' (the same as accept_pickle=True)"),
    "accept_pickle": (_flag, "True or False"),
    "worker_prefetch_multiplier": (_count, "a whole number >= 1"),
    "worker_concurrency": (_optional(_count), "None (the CPU count) or a whole number >= 1"),
    "worker_max_tasks_per_child": (_optional(_count), "None or a whole number >= 1"),
    "worker_max_memory_per_child": (_optional(_count), "None or KiB, a whole number >= 1"),
    "transport_ack_timeout": (_positive, "seconds (> 0)"),
    "transport_dns_refresh": (_positive, "seconds (> 0)"),
    "transport_max_peers": (_optional(_count), "None (no bound) or a whole number >= 1"),
    "producer_max_outbox": (_count, "a whole number >= 1"),
    "producer_outbox_full": (_one_of("block", "raise"), "'block' or 'raise'"),
    "producer_flush_timeout": (_optional(_non_negative), "None (wait until taken) or seconds (>= 0)"),
    "worker_queue_seconds": (_positive, "seconds (> 0)"),
    "worker_autoscale_keepalive": (_positive, "seconds (> 0)"),
    "worker_hijack_root_logger": (_flag, "True or False"),
    "worker_send_task_events": (_flag, "True or False"),
    "worker_disable_rate_limits": (_flag, "True or False"),
    "rate_limit_url": (_redis_url, "None (limits per worker) or a Redis URL: redis://host:port/db, "
                                   "rediss://host:port/db or unix:///path/redis.sock"),
    "max_message_size": (_count, "bytes, a whole number >= 1"),
}


_NO_BROKER = "there is no broker: clients send tasks straight to workers over ZeroMQ"
_MSGPACK_ONLY = "messages and results are always msgpack (accept_pickle opts in to pickle)"
_NO_EVENTS = "engine sends no task events"
_NO_QUEUES = "queues exist where a worker consumes them (engine-worker -Q); there is nothing to declare"
_OWN_LOGGING = ("engine-worker sets up its own logging (--loglevel, --logfile, --log-format, --log-config, "
                "or the setup_logging signal)")

#: Celery settings accepted and ignored (one warning per name says why). A name ending in
#: ``*`` stands for every setting with that prefix.
CELERY_IGNORED: dict[str, str] = {
    "broker_*": _NO_BROKER,
    "accept_content": _MSGPACK_ONLY,
    "result_accept_content": _MSGPACK_ONLY,
    "result_serializer": _MSGPACK_ONLY,
    "event_serializer": _MSGPACK_ONLY,
    "task_compression": _MSGPACK_ONLY,
    "result_compression": _MSGPACK_ONLY,
    "timezone": "times travel as UTC timestamps; nothing is shown in a local time zone",
    "enable_utc": "times travel as UTC timestamps",
    "task_queues": _NO_QUEUES,
    "task_create_missing_queues": _NO_QUEUES,
    "task_default_exchange": _NO_BROKER,
    "task_default_exchange_type": _NO_BROKER,
    "task_default_routing_key": _NO_BROKER,
    "task_default_delivery_mode": _NO_BROKER,
    "task_default_priority": "tasks have no priorities (use --fair, or a queue with its own worker)",
    "task_queue_max_priority": "tasks have no priorities (use --fair, or a queue with its own worker)",
    "task_inherit_parent_priority": "tasks have no priorities (use --fair, or a queue with its own worker)",
    "task_publish_retry": "a client keeps every message until a worker acknowledges it, and sends it again",
    "task_publish_retry_policy": "a client keeps every message until a worker acknowledges it, and sends it again",
    "task_send_sent_event": _NO_EVENTS,
    "event_*": _NO_EVENTS,
    "result_persistent": "the rpc:// backend keeps nothing on a broker",
    "result_exchange": _NO_BROKER,
    "result_exchange_type": _NO_BROKER,
    "result_extended": "stored results keep state, result, traceback and time",
    "worker_log_format": _OWN_LOGGING,
    "worker_task_log_format": _OWN_LOGGING,
    "worker_redirect_stdouts": _OWN_LOGGING,
    "worker_redirect_stdouts_level": _OWN_LOGGING,
    "worker_cancel_long_running_tasks_on_connection_loss": _NO_BROKER,
    "worker_pool": "the pool is always prefork",
    "worker_state_db": "the worker's journal keeps accepted tasks (--journal)",
    "beat_*": "engine has no beat scheduler",
    "control_*": "remote control goes over the transport (engine inspect / engine control)",
    "security_*": "message signing is not supported; use CURVE (engine keys)",
}


def celery_ignored_reason(name: str) -> str | None:
    """Why the Celery setting ``name`` does nothing here, or None when it is not one of those."""
    reason = CELERY_IGNORED.get(name)
    if reason is None:
        for pattern, why in CELERY_IGNORED.items():
            if pattern.endswith("*") and name.startswith(pattern[:-1]):
                return why
    return reason


class Settings:
    """Attribute and mapping access to an app's settings, refusing unknown names.

    Values live in the instance's ``__dict__``, so reading a setting is a plain
    attribute read (it happens on every ``delay()``); only unknown names reach
    ``__getattr__``, which raises.
    """

    def __init__(self, initial: Mapping[str, Any] | None = None, **settings: Any) -> None:
        self.__dict__.update(DEFAULTS)
        #: Celery settings given that have no meaning here (name -> value), kept so they read back.
        self.__dict__["celery_ignored"] = {}
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
        ignored = self.__dict__["celery_ignored"]
        if name in ignored:
            return ignored[name]
        self._check(name)
        raise AttributeError(name)  # pragma: no cover - every known name is in __dict__

    def __setattr__(self, name: str, value: Any) -> None:
        self.update({name: value})

    def __getitem__(self, name: str) -> Any:
        if name in self.__dict__["celery_ignored"]:
            return self.__dict__["celery_ignored"][name]
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
        """Set several settings at once; checks every name and value before changing any."""
        changes = {**(other or {}), **settings}
        ignored = {name: changes.pop(name) for name in list(changes)
                   if name not in DEFAULTS and celery_ignored_reason(name) is not None}
        for name in changes:
            self._check(name)
        for name, value in changes.items():
            check, expected = RULES[name]
            if not check(value):
                raise ImproperlyConfigured(f"invalid value for setting {name!r}: {value!r} (expected {expected})")
        serializer = changes.get("task_serializer", self.__dict__["task_serializer"])
        if serializer == "pickle":
            # Celery's task_serializer="pickle" is this engine's accept_pickle=True.
            if changes.get("accept_pickle") is False:
                raise ImproperlyConfigured("invalid value for setting 'accept_pickle': False contradicts "
                                           "task_serializer='pickle' (set task_serializer='msgpack' too)")
            changes["accept_pickle"] = True
        self.__dict__.update(changes)
        for name, value in ignored.items():
            _warn_ignored(name)
            self.__dict__["celery_ignored"][name] = value

    def as_dict(self) -> dict[str, Any]:
        """Return a copy of every setting and its value."""
        return {name: self.__dict__[name] for name in DEFAULTS}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.as_dict().items() if DEFAULTS[k] != v}
        return f"<Settings {changed!r}>"


_warned: set[str] = set()


def _warn_ignored(name: str) -> None:
    """One warning per ignored Celery setting per process."""
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"setting {name!r} is accepted but does nothing in engine: {celery_ignored_reason(name)}",
                      CeleryCompatibilityWarning, stacklevel=4)


def _similar(a: str, b: str) -> bool:
    """Cheap typo check: same length ±1 and at most two differing characters."""
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() > 0.85
