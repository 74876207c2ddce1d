"""This machine's name, and the name a worker gets when it is not given one."""

from __future__ import annotations

import os
import socket

__all__ = ("HOSTNAME", "default_worker_name")

#: This machine's name, read once (task requests and STARTED states carry it).
HOSTNAME = socket.gethostname()


def default_worker_name() -> str:
    """The name of a worker started without ``-n``: ``engine@HOST-PID``, unique on this host."""
    return f"engine@{HOSTNAME}-{os.getpid()}"
