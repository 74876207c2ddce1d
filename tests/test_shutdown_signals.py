"""How a worker is told to stop: warm, then cold; real signals sent to this process, handlers restored after."""

from __future__ import annotations

import os
import select
import signal

import pytest

from engine.worker.shutdown import COLD, HANDLED, WARM, ShutdownSignals
from tests.worker_helpers import wait_until


@pytest.fixture
def signals():
    """A ShutdownSignals; this process's stop-signal handlers and wake-up fd are put back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in HANDLED}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    shutdown = ShutdownSignals()
    yield shutdown
    shutdown.uninstall()
    signal.set_wakeup_fd(wakeup)
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def readable(fd: int, timeout: float = 2.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_first_term_or_int_asks_for_a_warm_shutdown_and_any_second_for_cold(first):
    shutdown = ShutdownSignals()
    assert shutdown.requested is None
    shutdown.request(first)
    assert shutdown.requested == WARM
    shutdown.request(signal.SIGTERM)
    assert shutdown.requested == COLD
    shutdown.request(signal.SIGTERM)
    assert shutdown.requested == COLD  # cold stays cold


def test_sigquit_asks_for_a_cold_shutdown_at_once():
    shutdown = ShutdownSignals()
    shutdown.request(signal.SIGQUIT)
    assert shutdown.requested == COLD


def test_installed_handlers_note_real_signals_and_wake_the_poll(signals):
    signals.install()
    assert signals.fd >= 0
    assert not readable(signals.fd, 0)

    os.kill(os.getpid(), signal.SIGTERM)

    wait_until(lambda: signals.requested, timeout=2, interval=0.001, message="the handler ran")
    assert signals.requested == WARM
    assert readable(signals.fd)  # a loop polling this fd wakes up at once
    signals.drain()
    assert not readable(signals.fd, 0)

    os.kill(os.getpid(), signal.SIGINT)
    wait_until(lambda: signals.requested == COLD, timeout=2, interval=0.001, message="the second signal was noted")
    signals.drain()


def test_uninstall_closes_the_pipe_and_a_late_signal_is_still_noted(signals):
    signals.install()
    signals.uninstall()

    assert signals.fd == -1
    assert signal.set_wakeup_fd(-1) == -1  # nothing writes to the closed pipe

    os.kill(os.getpid(), signal.SIGQUIT)
    wait_until(lambda: signals.requested, timeout=2, interval=0.001, message="the late signal was noted")
    assert signals.requested == COLD
