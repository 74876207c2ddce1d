"""The prefork pool: forks children, watches them, replaces those that exit or die."""

from __future__ import annotations

import collections
import logging
import os
import signal
import time

import psutil

from engine.worker import pipe
from engine.worker.report_log import log_path

__all__ = ("Child", "Pool")

logger = logging.getLogger("engine.worker.pool")


class Child:
    """One pool child as the supervisor sees it."""

    def __init__(self, pid: int, writer: pipe.FrameWriter, reader: pipe.FrameReader) -> None:
        self.pid = pid
        self.writer = writer
        self.reader = reader
        #: Tasks handed to this child, oldest (the running one) first.
        self.outstanding: collections.deque = collections.deque()
        #: False once the child may take no more tasks (retiring, stopping).
        self.accepting = True
        #: ``--fair``: expected seconds of work it holds (a kind not measured yet counts as long).
        self.queued_seconds = 0.0
        #: Its report log (engine.worker.report_log), when the worker keeps a journal.
        self.report_log: str | None = None
        #: The payload of the last DONE read from it: its report log is read on from there.
        self.last_done: bytes | None = None
        self.process = psutil.Process(pid)

    @property
    def fds(self) -> tuple[int, int]:
        """The supervisor's ends of the two pipes."""
        return self.writer.fd, self.reader.fd

    def __repr__(self) -> str:
        return f"<Child {self.pid} outstanding={len(self.outstanding)}>"


class Pool:
    """Forks ``concurrency`` children that inherit the app and its registry."""

    def __init__(self, apps: list, concurrency: int, hostname: str, options: dict) -> None:
        self.apps = apps
        self.concurrency = concurrency
        self.hostname = hostname
        self.options = options
        self.children: dict[int, Child] = {}
        self.by_fd: dict[int, Child] = {}
        #: Changes whenever a child is added or removed (the supervisor re-registers pipes only then).
        self.generation = 0
        #: Children started so far (numbers their report logs).
        self.started = 0

    def start(self) -> None:
        """Fork every child."""
        for _ in range(self.concurrency):
            self.spawn()

    def spawn(self) -> Child:
        """Fork one child and return it."""
        task_r, task_w = pipe.open_pipe()
        result_r, result_w = pipe.open_pipe()
        inherited = [fd for child in self.children.values() for fd in child.fds]
        options = self.options
        report_log = None
        if options.get("report_dir"):
            self.started += 1
            report_log = log_path(options["report_dir"], os.getpid(), self.started)
            options = {**options, "report_log": report_log}
        pid = os.fork()
        if pid == 0:  # the child
            try:
                for fd in (task_w, result_r, *inherited):
                    os.close(fd)
                from engine.worker.child import child_main

                child_main(self.apps, task_r, result_w, self.hostname, options)
            finally:
                os._exit(1)
        os.close(task_r)
        os.close(result_w)
        child = Child(pid, pipe.FrameWriter(task_w, blocking=False), pipe.FrameReader(result_r))
        child.report_log = report_log
        self.children[pid] = child
        self.by_fd[result_r] = child
        self.generation += 1
        logger.debug("started child %d", pid)
        return child

    def forget(self, child: Child) -> int | None:
        """Remove a child that exited (or is about to), reap it, and return its exit status."""
        self.children.pop(child.pid, None)
        self.by_fd.pop(child.reader.fd, None)
        self.generation += 1
        for fd in child.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        return reap(child.pid)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Signal a child (default: kill it)."""
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def busy(self) -> int:
        """Children holding a task (running it, or about to)."""
        return sum(1 for child in list(self.children.values()) if child.outstanding)

    def kill_all(self) -> None:
        """Kill every child at once (cold shutdown)."""
        for child in list(self.children.values()):
            self.kill(child)
        for child in list(self.children.values()):
            self.forget(child)


def reap(pid: int, timeout: float = 5.0) -> int | None:
    """Wait (bounded) for ``pid`` to exit; return its exit status, or -signal when killed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)
