"""Hard time limits: a child whose task runs past its limit is killed.

The limit of a task is, in order, the call's ``time_limit`` option, the
task's ``time_limit`` attribute, then the worker's ``--time-limit``
(``task_time_limit``). It counts from the moment the child started that task,
not from when the child was handed it. The request's ``on_timeout(False,
limit)`` handler runs in the supervisor before the kill; the task then fails
with :class:`~engine.exceptions.TimeLimitExceeded` when its child's exit is
read. (Soft limits are the child's own business: a SIGALRM timer.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.worker.pool import Child, Pool

__all__ = ("TimeLimits",)

logger = logging.getLogger("engine.worker")

#: Seconds a child gets to die of a terminating revoke's signal before it is killed (SIGKILL).
TERMINATE_GRACE = 5.0


class TimeLimits:
    """Kills children past their task's hard limit and remembers why each one died."""

    def __init__(self, pool: Pool, default_limit: float | None, hostname: str) -> None:
        self.pool = pool
        self.default_limit = default_limit
        self.hostname = hostname
        #: pid -> (reason, limit or signal) of children killed on purpose and not yet reaped.
        self._killed: dict[int, tuple[str, float]] = {}
        #: pid -> (when, the task id) of children sent a signal by a terminating revoke.
        self._terminated: dict[int, tuple[float, str]] = {}

    def enforce(self, now: float, children: Iterable[Child]) -> None:
        """Kill every child whose running task is past its limit at ``now`` (monotonic)."""
        for child in children:
            terminated = self._terminated.get(child.pid)
            if terminated is not None and now - terminated[0] > TERMINATE_GRACE:
                # The revoke's signal did not end it (handled, or stopped): make sure, once.
                logger.warning("child %d still alive %.0fs after a terminating revoke: SIGKILL", child.pid,
                               TERMINATE_GRACE)
                self._terminated[child.pid] = (float("inf"), terminated[1])
                self.pool.kill(child)
            if not child.outstanding or child.pid in self._killed:
                continue
            entry = child.outstanding[0]
            if not entry.started:
                continue
            limit = entry.message.options.get("time_limit") or entry.task.time_limit or self.default_limit
            if limit and now - entry.started > float(limit):
                logger.error("task %s[%s] ran past its time limit (%ss): killing child %d",
                             entry.message.task, entry.message.id, limit, child.pid)
                self._killed[child.pid] = ("time_limit", float(limit))
                try:
                    request = entry.task.request_class(entry.message, entry.task, hostname=self.hostname)
                    request.on_timeout(False, float(limit))
                except Exception:
                    logger.exception("on_timeout handler failed")
                self.pool.kill(child)

    def terminate(self, child: Child, signum: int, task_id: str) -> None:
        """Stop ``child``'s running task ``task_id`` on purpose (a revoke with terminate): its exit is not a loss."""
        self._killed[child.pid] = ("revoked", float(signum))
        self._terminated[child.pid] = (time.monotonic(), task_id)
        self.pool.kill(child, signum)

    def terminated_task(self, pid: int) -> str | None:
        """The task a terminating revoke aimed at in child ``pid`` (and forget it), or None."""
        entry = self._terminated.pop(pid, None)
        return entry[1] if entry is not None else None

    def killing(self, pid: int) -> bool:
        """True while a child killed for its time limit has not been reaped."""
        return pid in self._killed

    def reason(self, pid: int) -> tuple[str, float] | None:
        """Why the child ``pid`` was killed (and forget it), or None when it was not killed on purpose."""
        return self._killed.pop(pid, None)
