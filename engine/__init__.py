"""engine: a broker-less prefork task worker over ZeroMQ with Celery's task API.

::

    from engine import Engine

    app = Engine("proj", backend="sqlite:///results.db")

    @app.task
    def add(x, y):
        return x + y

    add.delay(2, 2)

The hot paths (message codec, registry lookup, backoff, state recording) are
compiled with Cython; ``HAS_EXTENSION`` tells whether the compiled core is in
use (``ENGINE_NO_EXTENSIONS=1`` forces the pure-Python twin).
"""

from engine import states
from engine._version import __version__ as __version__
from engine.app import Engine
from engine.canvas import GroupResult, Signature, as_completed, chain, chord, chunks, group, signature
from engine.core import HAS_EXTENSION, IMPLEMENTATION
from engine.current import current_app, current_task, shared_task
from engine.exceptions import OutboxFull
from engine.result import AsyncResult, EagerResult
from engine.task import Task

__all__ = (
    "HAS_EXTENSION",
    "IMPLEMENTATION",
    "AsyncResult",
    "EagerResult",
    "Engine",
    "GroupResult",
    "OutboxFull",
    "Signature",
    "Task",
    "as_completed",
    "chain",
    "chord",
    "chunks",
    "current_app",
    "current_task",
    "group",
    "shared_task",
    "signature",
    "states",
)

