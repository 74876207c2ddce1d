"""Revoked tasks: the ids a worker must not start, kept for a while and across restarts.

``app.control.revoke(task_id)`` (or ``AsyncResult.revoke()``) reaches every
worker; each adds the id here. A task revoked before it arrives (still in a
client's outbox, sent later as a retry) is recognised when it arrives; one
already waiting (for a child, or for its ETA) is taken out at once. Revoking
by ``root_id`` cancels every task of a batch or chain that carries it. As in
Celery, entries expire (:data:`REVOKE_EXPIRES`) and the set is bounded
(:data:`REVOKES_MAX`, the oldest go first); unlike Celery's in-memory set, it
is saved in the worker's journal, so a restarted worker still refuses them
(also the tasks its journal replays).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core import TaskMessage

__all__ = ("REVOKES_MAX", "REVOKE_EXPIRES", "RevokedSet")

#: Most revoked ids kept (Celery's ``REVOKES_MAX``).
REVOKES_MAX = 50_000
#: Seconds a revoked id is kept (Celery's ``REVOKE_EXPIRES``: 3 hours).
REVOKE_EXPIRES = 10_800.0
#: Prefix of a revoked root id in the set (a root id is a task id too: kept apart).
ROOT = "root:"


class RevokedSet:
    """Task ids and root ids revoked lately, each with its expiry (unix time)."""

    def __init__(self, max_entries: int = REVOKES_MAX, expires: float = REVOKE_EXPIRES) -> None:
        self.max_entries = max_entries
        self.expires = expires
        #: key (a task id, or ``root:`` + a root id) -> expiry; insertion order is age order.
        self.entries: dict[str, float] = {}
        #: What changed since the owner last saved (see :meth:`take_changes`): saved one by one,
        #: a revoke never rewrites the whole set.
        self._added: dict[str, float] = {}
        self._removed: set[str] = set()

    @property
    def changed(self) -> bool:
        """True when entries changed since the last :meth:`take_changes`."""
        return bool(self._added or self._removed)

    def take_changes(self) -> tuple[dict[str, float], set[str]]:
        """The entries added (with their expiry) and the keys removed since the last call."""
        added, removed = self._added, self._removed
        self._added, self._removed = {}, set()
        return added, removed

    def give_back_changes(self, added: dict[str, float], removed: set[str]) -> None:
        """Changes taken by :meth:`take_changes` that could not be saved: saved with the next ones."""
        for key, expiry in added.items():
            if key in self.entries and key not in self._removed:
                self._added.setdefault(key, expiry)
        self._removed |= {key for key in removed if key not in self.entries}

    def _drop(self, key: str) -> None:
        del self.entries[key]
        if self._added.pop(key, None) is None:
            self._removed.add(key)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, task_ids: Iterable[str] = (), root_ids: Iterable[str] = (), now: float | None = None) -> None:
        """Revoke ``task_ids`` and every task whose root is one of ``root_ids``."""
        expiry = (now if now is not None else time.time()) + self.expires
        for key in [*task_ids, *(ROOT + root for root in root_ids)]:
            self.entries.pop(key, None)  # re-revoking renews it (and makes it the newest)
            self.entries[key] = expiry
            self._added[key] = expiry
            self._removed.discard(key)
        while len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries)))

    def load(self, saved: dict[str, float], now: float | None = None) -> None:
        """Start from what an earlier run saved (expired ones dropped)."""
        now = now if now is not None else time.time()
        for key, expiry in sorted(saved.items(), key=lambda item: item[1]):
            if expiry > now:
                self.entries[key] = expiry
            else:
                self._removed.add(key)  # expired while the worker was down: deleted at the next save

    def purge(self, now: float | None = None) -> None:
        """Drop expired entries."""
        now = now if now is not None else time.time()
        for key in [key for key, expiry in self.entries.items() if expiry <= now]:
            self._drop(key)

    def matches(self, message: TaskMessage) -> bool:
        """True when ``message`` is revoked: its id, or its root's (a task that is its own root counts too)."""
        entries = self.entries
        if not entries:
            return False
        root = message.root_id or message.id
        return message.id in entries or ROOT + root in entries

    def task_ids(self) -> list[str]:
        """The revoked task ids (not the root ids)."""
        return [key for key in self.entries if not key.startswith(ROOT)]
