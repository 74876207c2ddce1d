"""Task ids: random UUIDs (version 4) in their usual text form.

The id is made by the core (``engine.core.new_task_id``): the compiled twin
formats blocks of random bytes without building a ``uuid.UUID``, since this
runs on every ``delay()``. This module is the name the task, the canvas and the
tracer import it by.
"""

from __future__ import annotations

from engine.core import new_task_id

__all__ = ("new_task_id",)
