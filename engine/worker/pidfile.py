"""``engine-worker --pidfile PATH``: the supervisor's pid in a file, and no second worker on it.

A pidfile that names a live process refuses the start (two workers would share
a journal and a name); one left by a worker that died is taken over. The file
is written whole (a temporary file renamed) and removed at exit if it still
names this process.
"""

from __future__ import annotations

import os

import psutil

from engine.exceptions import ImproperlyConfigured

__all__ = ("Pidfile",)


class Pidfile:
    """The pidfile at ``path``: :meth:`acquire` at start, :meth:`release` at exit."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def read(self) -> int | None:
        """The pid the file names, or None (no file, or not a number)."""
        try:
            with open(self.path, encoding="ascii") as fh:
                return int(fh.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Write this process's pid; raise ImproperlyConfigured when the file names a live process."""
        pid = self.read()
        if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
            raise ImproperlyConfigured(f"pidfile {self.path} names a running process (pid {pid}): "
                                       "is another worker running? (remove the file if not)")
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise ImproperlyConfigured(f"cannot write the pidfile {self.path}: {exc}") from None

    def release(self) -> None:
        """Remove the file if it still names this process."""
        if self.read() == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass
