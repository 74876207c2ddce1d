"""The app the worker tests run: ``engine-worker -A tests.workerapp``.

Endpoint and backend come from the environment so each test picks free ones.
Tasks that need to be observed from outside write to files given as arguments.
"""

from __future__ import annotations

import os
import signal
import time

from engine import Engine
from engine.exceptions import Reject, SoftTimeLimitExceeded

app = Engine(
    "workerapp",
    # One endpoint, or several separated by commas (a client connected to several workers).
    transport=os.environ.get("ENGINE_TEST_ENDPOINT", "tcp://127.0.0.1:5599").split(","),
    backend=os.environ.get("ENGINE_TEST_BACKEND") or None,
    worker_autoscale_keepalive=float(os.environ.get("ENGINE_TEST_AUTOSCALE_KEEPALIVE", "30")),
    transport_dns_refresh=float(os.environ.get("ENGINE_TEST_DNS_REFRESH", "5")),
    # A Redis URL: workers share each task's rate limit through it (None: limits per worker).
    rate_limit_url=os.environ.get("ENGINE_TEST_RATE_LIMIT_URL") or None,
)

_hog: list = []


@app.task
def add(x, y):
    return x + y


@app.task(ignore_result=True)
def noop():
    return None


@app.task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def log_run(path, label, seconds=0.0):
    """Append ``label start end pid`` to ``path`` around a sleep of ``seconds``."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as fh:
        fh.write(f"{label} {start:.6f} {time.time():.6f} {os.getpid()}\n")
    return label


@app.task(name="workerapp.long")
def long_task(path, label, seconds):
    return log_run(path, label, seconds)


@app.task(name="workerapp.short")
def short_task(path, label, seconds):
    return log_run(path, label, seconds)


@app.task
def whoami(seconds=0.0):
    time.sleep(seconds)
    return os.getpid()


@app.task
def crash():
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def crash_leaving_a_grandchild(pid_file, seconds):
    """Die, leaving a forked copy that keeps this child's pipes open (no end of file for the supervisor)."""
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    with open(pid_file, "w") as out:
        out.write(str(pid))
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(acks_late=True, reject_on_worker_lost=True)
def crash_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


@app.task
def soft_limited(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task
def unencodable():
    return object()


@app.task(bind=True, default_retry_delay=0.2)
def flaky(self, succeed_on):
    if self.request.retries < succeed_on:
        raise self.retry()
    return self.request.retries


@app.task
def reject_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise Reject("not yet", requeue=True)
    return "accepted"


@app.task(queue="slow")
def on_slow_queue():
    return os.getpid()


@app.task
def hog(kib):
    _hog.append(bytearray(kib * 1024))
    return os.getpid()


@app.task
def fails(message):
    raise ValueError(message)


class PaymentError(Exception):
    """A custom exception that keeps its arguments in .args, as the Tasks guide asks."""

    def __init__(self, account, amount):
        super().__init__(account, amount)
        self.account = account
        self.amount = amount


@app.task
def charge(account, amount):
    raise PaymentError(account, amount)


def _wait_for_file(path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@app.task(bind=True)
def reports_progress(self, gate):
    self.update_state(state="PROGRESS", meta={"done": 50})
    _wait_for_file(gate)
    return "finished"


@app.task(track_started=True)
def tracked(gate):
    _wait_for_file(gate)
    return "finished"


@app.task(ignore_result=True)
def ignored_by_option(path):
    return log_run(path, "option")


@app.task
def exits():
    import sys

    sys.exit(0)


@app.task
def mark(directory, number):
    """Record one execution (for counting duplicates), then return the number."""
    with open(os.path.join(directory, f"{os.getpid()}.runs"), "a") as fh:
        fh.write(f"{number}\n")
    return number


@app.task
def mark_host(directory, number, seconds=0.0):
    """Sleep ``seconds``, then record one execution in a file named by the host (ENGINE_TEST_HOST) and pid."""
    time.sleep(seconds)
    host = os.environ.get("ENGINE_TEST_HOST", "local")
    with open(os.path.join(directory, f"{host}-{os.getpid()}.runs"), "a") as fh:
        fh.write(f"{number}\n")
    return number


@app.task(track_started=True)
def tracked_sleep(seconds):
    """Record STARTED, then sleep: a task that is visibly running for a while."""
    time.sleep(seconds)
    return seconds


@app.task(bind=True, autoretry_for=(ValueError,), max_retries=0, default_retry_delay=0.05)
def override_then_fail(self, mode):
    """``"override"``: retry once with its own max_retries=1. ``"fail"``: raise ValueError (autoretried)."""
    if mode == "override" and self.request.retries == 0:
        raise self.retry(max_retries=1)
    if mode == "fail":
        raise ValueError(f"attempt {self.request.retries}")
    return self.request.retries


@app.task
def tsum_marked(values, path):
    """A chord body: append one line to ``path`` per run (to count runs), return the sum."""
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return sum(values)


@app.task
def tsum(values):
    """A chord body (and a chain step after a group): the sum of the results."""
    return sum(values)


@app.task
def say(text):
    """Log ``text`` at WARNING from the task (the log file tests read it)."""
    import logging

    logging.getLogger("tests.workerapp.say").warning("said: %s", text)
    return text


@app.task(rate_limit="10/s")
def limited(path, label):
    """At most 10 runs a second per worker: appends ``label start`` to ``path``."""
    with open(path, "a") as fh:
        fh.write(f"{label} {time.time():.6f}\n")
    return label


@app.task(bind=True)
def retries_later(self, countdown):
    """Asks to be retried in ``countdown`` seconds once, then returns "retried"."""
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return "retried"
