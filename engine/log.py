"""Task loggers: log records that carry the running task's name and id.

``get_task_logger(__name__)`` at the top of a tasks module gives a logger whose
records have ``task_name`` and ``task_id`` attributes (``???`` outside a task),
so a format such as :data:`TASK_FORMAT` shows which task said what.
"""

from __future__ import annotations

import logging

from engine import context

__all__ = ("TASK_FORMAT", "WORKER_FORMAT", "TaskContextFilter", "TaskFormatter", "get_task_logger")

#: Default format of worker log lines that come from tasks.
TASK_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
#: The format ``engine-worker`` logs with: lines a task's code logs start with ``name[id]: ``.
WORKER_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s %(process)d] %(task_prefix)s%(message)s"
#: Parent of every task logger, so one handler or level covers all tasks.
TASK_LOGGER_NAME = "engine.task"


class TaskContextFilter(logging.Filter):
    """Adds the running task's fields to each record.

    ``task_name`` and ``task_id`` (``???`` outside a task), and ``task_prefix``:
    ``name[id]: `` on lines a task's own code logs, empty on the engine's lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        running = context.current()
        if running is None or not running[1].id:
            fields.setdefault("task_name", "???")
            fields.setdefault("task_id", "???")
            fields.setdefault("task_prefix", "")
        else:
            task, request = running
            name = getattr(task, "name", "???")
            fields.setdefault("task_name", name)
            fields.setdefault("task_id", request.id)
            engine_line = record.name == "engine" or record.name.startswith("engine.")
            fields.setdefault("task_prefix", "" if engine_line else f"{name}[{request.id}]: ")
        return True


class TaskFormatter(logging.Formatter):
    """A formatter for :data:`TASK_FORMAT` that also formats records from non-task loggers."""

    def __init__(self, fmt: str = TASK_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        TaskContextFilter().filter(record)
        return super().format(record)


_filter = TaskContextFilter()


def get_task_logger(name: str) -> logging.Logger:
    """Return a logger for tasks whose records carry the running task's name and id.

    Its parent is the ``engine.task`` logger, as Celery's task loggers hang
    below ``celery.task``.
    """
    if name in (TASK_LOGGER_NAME, "engine"):
        raise ValueError(f"logger name {name!r} is reserved for the engine")
    logger = logging.getLogger(name)
    logger.parent = logging.getLogger(TASK_LOGGER_NAME)
    if _filter not in logger.filters:
        logger.addFilter(_filter)
    return logger
