"""Task ids: time-ordered UUIDs (version 7, RFC 9562) in their usual text form.

Any code that reads a task id as a UUID (``uuid.UUID(task_id)``), as Celery's
uuid4 ids allow, reads these too. Version 7 rather than Celery's version 4:
its first 48 bits are the time in milliseconds, so ids made in a later
millisecond sort later (a clock set back breaks that, nothing else) and the
results table's primary key (SQLite's B-tree, an index elsewhere)
takes new rows at its end. Random ids put each row of a stored batch on a
different page, and each commit rewrote that many pages.

The id is made by the core (``engine.core.new_task_id``): the compiled twin
formats blocks of random bytes without building a ``uuid.UUID``, since this
runs on every ``delay()``. This module is the name the task, the canvas and the
tracer import it by.
"""

from __future__ import annotations

from engine.core import new_task_id

__all__ = ("new_task_id",)
