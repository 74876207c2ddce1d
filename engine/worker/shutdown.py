"""How a worker is told to stop: SIGTERM/SIGINT for a warm shutdown, a second one or SIGQUIT for cold.

The handlers only note the request; the supervisor's loop acts on it. They
also write to a wake-up pipe (``signal.set_wakeup_fd``) that the loop polls,
so a signal ends the poll at once instead of at its next timeout.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

__all__ = ("COLD", "WARM", "ShutdownSignals")

#: Finish accepted and running tasks, then exit.
WARM = "warm"
#: Kill the children and exit now.
COLD = "cold"

#: The signals a supervisor handles.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class ShutdownSignals:
    """The stop requests a worker received: ``requested`` is None, :data:`WARM` or :data:`COLD`."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.fd = -1
        self._write_fd = -1

    def request(self, signum: int) -> None:
        """Note one stop signal: SIGQUIT, or any signal after the first, asks for a cold shutdown."""
        self.requested = COLD if signum == signal.SIGQUIT or self.requested else WARM

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def install(self) -> None:
        """Handle the stop signals in this process and open the wake-up pipe (:attr:`fd` to poll)."""
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)

    def drain(self) -> None:
        """Empty the wake-up pipe (the signals themselves were noted by the handler)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def uninstall(self) -> None:
        """Stop writing to the wake-up pipe and close it (the handlers stay: a late signal is noted)."""
        signal.set_wakeup_fd(-1)
        for fd in (self.fd, self._write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._write_fd = -1
