"""This process's id, read without a system call.

``os.getpid()`` is a system call on every read (glibc stopped caching it), and
the producer and the result backends ask on every call whether they were
inherited through a fork. :func:`pid` answers from a value that an at-fork
hook renews in the child. Python's own forks run the hook (``os.fork``,
``multiprocessing``, the worker's pool); a fork made by C code that bypasses
them, without an exec after it, would keep the parent's id.
"""

from __future__ import annotations

import os

__all__ = ("pid",)

_pid = os.getpid()


def _renew() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew)


def pid() -> int:
    """This process's id (``os.getpid()``, renewed after each fork)."""
    return _pid
