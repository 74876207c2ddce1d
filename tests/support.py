"""Task classes and helpers the tests import by name (``'tests.support:DatabaseTask'``)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

import engine._core_py as py_core
import engine.core
from engine import Task
from engine.request import Request


class FakeDatabase:
    """Stands in for a database connection: counts how often it was opened."""

    opened = 0

    def __init__(self) -> None:
        FakeDatabase.opened += 1
        self.rows: list = []


class DatabaseTask(Task):
    """The Tasks guide's DatabaseTask: one connection per process, opened on first use."""

    _db = None

    @property
    def db(self) -> FakeDatabase:
        if self._db is None:
            self._db = FakeDatabase()
        return self._db


class RecordingRequest(Request):
    """A custom request class that remembers which hooks ran."""

    seen: list = []

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        super().on_failure(exc_info, send_failed_event, return_ok)
        RecordingRequest.seen.append(("failure", self.task.name, type(exc_info.exception).__name__))

    def on_success(self, retval, runtime):
        super().on_success(retval, runtime)
        RecordingRequest.seen.append(("success", self.task.name, retval))


class RecordingRequestTask(Task):
    Request = "tests.support:RecordingRequest"


def decorator1(fun):
    """Adds one to the result (the guide's "multiple decorators")."""

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return fun(*args, **kwargs) + 1

    return wrapper


def decorator2(fun):
    """Doubles the result."""

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return fun(*args, **kwargs) * 2

    return wrapper


@contextlib.contextmanager
def child_pipe() -> Iterator[tuple[Any, Any, Any]]:
    """A real pipe to run ``engine.worker.child._run_one`` into, in this process.

    Yields ``(writer, recorder, read)``: the child's FrameWriter and ChildRecorder on
    the pipe, and ``read()``, which flushes the writer and returns the frames that came
    through as ``{kind: [unpacked payload, ...]}``. Both ends are closed afterwards.
    """
    from engine.worker import child, pipe

    read_fd, write_fd = os.pipe()
    writer = pipe.FrameWriter(write_fd, blocking=True)
    reader = pipe.FrameReader(read_fd)

    def read() -> dict[int, list]:
        writer.flush()
        frames: dict[int, list] = {}
        for kind, payload in reader.read():
            frames.setdefault(kind, []).append(msgpack.unpackb(payload, raw=False))
        return frames

    try:
        yield writer, child.ChildRecorder(writer, accept_pickle=False), read
    finally:
        os.close(read_fd)
        os.close(write_fd)


try:
    import engine._core as c_core
except ImportError:
    c_core = None

#: Both cores as test parameters: the pure twin, and the compiled core when it is the one in use
#: (under ENGINE_NO_EXTENSIONS the app's objects, such as its registry, are the twin's).
CORE_TWINS = [pytest.param(py_core, id="python"),
              pytest.param(c_core, id="cython", marks=pytest.mark.skipif(
                  engine.core.IMPLEMENTATION != "cython", reason="the compiled core is not in use"))]
