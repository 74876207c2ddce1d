"""Which queue a task message goes to: the ``task_routes`` setting.

A route is a dict mapping a task name or a glob (``'proj.slow.*'``) to a queue
name or to ``{'queue': name}``, or a callable ``(name, args, kwargs, options)``
returning one of those or None. ``task_routes`` is one route or a list tried in
order. The call's ``queue=`` wins over the task's ``queue`` option, which wins
over the routes, which win over ``task_default_queue`` (Celery's order).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from engine.exceptions import ImproperlyConfigured

__all__ = ("route_queue",)


def _queue_of(destination: Any) -> str | None:
    if destination is None:
        return None
    if isinstance(destination, str):
        return destination
    if isinstance(destination, dict):
        queue = destination.get("queue")
        if isinstance(queue, str):
            return queue
    raise ImproperlyConfigured(f"a task route must give a queue name or {{'queue': name}}, not {destination!r}")


def _match(route: Any, name: str, args: tuple, kwargs: dict, options: dict) -> str | None:
    if callable(route):
        return _queue_of(route(name, args, kwargs, options))
    if isinstance(route, dict):
        if name in route:
            return _queue_of(route[name])
        for pattern, destination in route.items():
            if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
                return _queue_of(destination)
        return None
    raise ImproperlyConfigured(f"task_routes entries must be dicts or callables, not {route!r}")


def route_queue(routes: Any, name: str, args: tuple = (), kwargs: dict | None = None,
                options: dict | None = None) -> str | None:
    """Return the queue ``routes`` give task ``name``, or None when no route matches."""
    if not routes:
        return None
    for route in routes if isinstance(routes, (list, tuple)) else (routes,):
        queue = _match(route, name, args, kwargs or {}, options or {})
        if queue is not None:
            return queue
    return None
