"""How ``engine-worker`` sets up logging: where lines go, in which format, and who decides.

In this order of precedence:

1. a receiver connected to the ``setup_logging`` signal (the app configures
   logging itself): the worker leaves logging alone, as Celery does;
2. ``--log-config FILE``: ``logging.config.dictConfig`` of a JSON or YAML file;
3. otherwise one handler on the root logger: stderr, or ``--logfile PATH``
   (a ``WatchedFileHandler``: every process reopens the file once logrotate
   moved it, and the supervisor also reopens it on SIGHUP), with
   ``--log-format text`` (:data:`engine.log.WORKER_FORMAT`) or ``json`` (one
   object per line, with the task's name and id, by ``python-json-logger``).
   The root's other handlers are removed unless ``worker_hijack_root_logger``
   is False.

Then ``after_setup_logger`` and ``after_setup_task_logger`` are sent.
"""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import os
from typing import Any

from engine import signals
from engine.exceptions import ImproperlyConfigured
from engine.log import TASK_LOGGER_NAME, WORKER_FORMAT, TaskContextFilter

__all__ = ("JSON_FIELDS", "configure_logging", "reopen_log_files")

#: The record fields a JSON line carries (``--log-format json``).
JSON_FIELDS = ("asctime", "levelname", "name", "processName", "process", "task_name", "task_id", "message")


def configure_logging(level: str, logfile: str | None = None, log_format: str = "text",
                      log_config: str | None = None, hijack_root: bool = True) -> None:
    """Set up the worker's logging (see the module docstring); raises ImproperlyConfigured on a bad option."""
    level = level.upper()
    if signals.setup_logging.receivers:
        signals.setup_logging.send(sender=None, loglevel=level, logfile=logfile, format=log_format, colorize=False)
        return
    root = logging.getLogger()
    if log_config:
        logging.config.dictConfig(_read_config(log_config))
    else:
        handler: logging.Handler
        if logfile:
            try:
                handler = logging.handlers.WatchedFileHandler(logfile)
            except OSError as exc:
                raise ImproperlyConfigured(f"cannot open the log file {logfile!r}: {exc}") from None
        else:
            handler = logging.StreamHandler()
        handler.addFilter(TaskContextFilter())
        handler.setFormatter(_formatter(log_format))
        if hijack_root:
            root.handlers[:] = [handler]
        else:
            root.addHandler(handler)
        root.setLevel(level)
    arguments = {"loglevel": level, "logfile": logfile, "format": log_format, "colorize": False}
    signals.after_setup_logger.send(sender=None, logger=root, **arguments)
    signals.after_setup_task_logger.send(sender=None, logger=logging.getLogger(TASK_LOGGER_NAME), **arguments)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "text":
        return logging.Formatter(WORKER_FORMAT)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(" ".join(f"%({field})s" for field in JSON_FIELDS))
    raise ImproperlyConfigured(f"--log-format is text or json, got {log_format!r}")


def _read_config(path: str) -> dict[str, Any]:
    """A dictConfig dict from a JSON or YAML file (by its extension; YAML read safely)."""
    try:
        with open(path, encoding="utf-8") as fh:
            if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
                import yaml

                config = yaml.safe_load(fh)
            else:
                config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"cannot read the log config {path!r}: {exc}") from None
    if not isinstance(config, dict):
        raise ImproperlyConfigured(f"the log config {path!r} must hold a mapping (logging.config.dictConfig's)")
    config.setdefault("version", 1)
    # dictConfig's default would silence every logger that exists already: the engine's own.
    config.setdefault("disable_existing_loggers", False)
    return config


def reopen_log_files() -> int:
    """Reopen every file a logger writes to (after logrotate moved it); return how many.

    A file that cannot be reopened is reported and skipped: logging must not stop the worker.
    """
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    handlers = {id(h): h for logger in loggers for h in logger.handlers if isinstance(h, logging.FileHandler)}
    reopened = 0
    for handler in handlers.values():
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.stream.close()
            handler.stream = handler._open()
            reopened += 1
        except OSError as exc:
            handler.stream = None  # FileHandler opens it again at its next line
            logging.getLogger("engine.worker").error("could not reopen the log file %s: %s", handler.baseFilename, exc)
        finally:
            handler.release()
    return reopened
