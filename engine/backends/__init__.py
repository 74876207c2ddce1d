"""Result backends: where task states and results are stored and read.

:func:`backend_from_url` picks one by URL scheme. ``None`` gives the
:class:`~engine.backends.base.DisabledBackend`, which says clearly that
results are off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.backends.base import Backend, DisabledBackend
from engine.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ("BACKENDS", "Backend", "DisabledBackend", "backend_from_url")

#: URL scheme -> 'module:Class' of the backend that serves it.
BACKENDS = {
    "memory": "engine.backends.memory:MemoryBackend",
    "sqlite": "engine.backends.sqlite:SQLiteBackend",
    "rpc": "engine.backends.rpc:RPCBackend",
    "redis": "engine.backends.redis:RedisBackend",
}


def backend_from_url(url: str | None, app: Engine | None = None) -> Backend:
    """Return the backend for ``url`` (``memory://`` ...), or the disabled backend for None."""
    from engine.utils.imports import symbol_by_name

    if not url:
        return DisabledBackend(url, app)
    scheme = url.partition("://")[0] if "://" in url else url
    if scheme not in BACKENDS:
        raise ImproperlyConfigured(
            f"no result backend for URL {url!r}; known schemes: {', '.join(sorted(BACKENDS))}")
    backend_class: type[Backend] = symbol_by_name(BACKENDS[scheme])
    return backend_class(url, app)
