"""Client processes for the ``clients`` scenario: idle ones, active ones, and one that arrives last.

Every web-server process is a client of the workers: it sends a task now and
then and stays connected in between. Each client here is a process of its
own, with its own producer, forked from the bench process (which has imported
engine, so forking a hundred costs little, and which holds no producer of its
own while this scenario runs: each child makes its own after the fork). The
parent talks to each child over a one-way pipe and three shared events, waits
for each of them with a deadline, and stops every one of them by pid at the
end, also when the run failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import traceback
from multiprocessing.connection import Connection, wait

__all__ = ("FIRST_TIMEOUT", "LATE_TIMEOUT", "READY_TIMEOUT", "Fleet", "load_seconds")

#: Seconds the late client waits for one result before it reports itself starved (and stops).
LATE_TIMEOUT = 10.0
#: Seconds an idle or active client waits for its first task's result; then it counts as starved at start.
FIRST_TIMEOUT = 30.0
#: Seconds the parent waits for every client to report on its first task.
READY_TIMEOUT = FIRST_TIMEOUT + 90.0
#: Least no-op tasks/s expected of the active clients together: a slower load ends early (see load_seconds).
LOAD_RATE_FLOOR = 1000
#: Seconds added to every load's bound (start-up, a slow machine).
LOAD_GRACE = 30.0
#: Seconds an active client waits at most for its tasks to be acknowledged (the parent gives up sooner).
FLUSH_TIMEOUT = 3600.0
#: Seconds the clients get to exit once told to, before SIGTERM (then SIGKILL) by pid.
EXIT_GRACE = 10.0
#: How often a waiting client checks that the bench process is still there.
PARENT_CHECK = 1.0


def _client(role: str, endpoint: str, backend: str, conn: Connection, events: tuple, count: int, samples: int,
            parent: int) -> None:
    """A client process's life: ``idle``, ``active`` or ``late`` (runs in the forked child)."""
    go, load_done, leave = events
    try:
        from bench import apps

        apps.app.close()  # what the parent held is the parent's: this process makes its own producer
        apps.app.conf.update(transport=endpoint, result_backend=backend, producer_flush_timeout=1)
        if role == "late":
            conn.send(("done", _late(apps, load_done, samples)))
        else:
            try:  # a web process's first request: connected, one task run
                apps.add.delay(0, 0).get(timeout=FIRST_TIMEOUT)
                starved = 0
            except TimeoutError:  # its task stays in its outbox, asking for credit; the row counts it
                starved = 1
            conn.send(("ready", starved))
            if role == "active":
                if not go.wait(READY_TIMEOUT):
                    raise TimeoutError(f"no start signal in {READY_TIMEOUT}s")
                for i in range(count):
                    apps.noop.delay(i, i)
                # A backlog of thousands is the point here: no "waiting for a worker" warnings.
                logging.getLogger("engine.producer").setLevel(logging.ERROR)
                apps.app.producer.flush(FLUSH_TIMEOUT)
                conn.send(("done", None))
        # Stay connected (and idle) until told to leave, or until the bench process is gone.
        while not leave.wait(PARENT_CHECK) and os.getppid() == parent:
            pass
        apps.app.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def load_seconds(tasks: int) -> float:
    """How long the active clients' ``tasks`` may take before the row ends without them."""
    return LOAD_GRACE + tasks / LOAD_RATE_FLOOR


def _late(apps, load_done, samples: int) -> dict:
    """One task at a time until ``samples`` or the load is over: each wait from ``delay()`` to its result, in ms."""
    apps.app.backend.listen()  # connect first (rpc): the first wait is the arrival, not the producer's start-up
    waits: list[float] = []
    starved = 0
    for i in range(samples):
        started = time.perf_counter()
        try:
            apps.add.delay(i, 1).get(timeout=LATE_TIMEOUT)
        except TimeoutError:
            # Counted as the timeout (a lower bound); the next tasks would wait as long.
            starved = 1
            waits.append(LATE_TIMEOUT * 1000)
            break
        waits.append((time.perf_counter() - started) * 1000)
        if load_done.is_set():
            break
    return {"waits_ms": waits, "starved": starved}


class Fleet:
    """Client processes forked from this one, each with a pipe back; all stopped by pid on exit.

    Fork before this process makes a producer of its own (a fork does not copy
    the producer's I/O thread, and each child makes a new producer and ZeroMQ
    context anyway).
    """

    def __init__(self, endpoint: str, backend: str) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.context = multiprocessing.get_context("fork")
        #: Set by the parent: the active clients start sending; their tasks are all done; everyone leaves.
        self.go, self.load_done, self.leave = self.context.Event(), self.context.Event(), self.context.Event()
        self.processes: dict[Connection, multiprocessing.process.BaseProcess] = {}

    def start(self, role: str, count: int = 0, samples: int = 0) -> Connection:
        """Fork one client process; return the end of its pipe this process reads."""
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_client, name=f"bench-client-{role}", daemon=True,
            args=(role, self.endpoint, self.backend, writer, (self.go, self.load_done, self.leave), count, samples,
                  os.getpid()))
        try:
            process.start()
        except BaseException:
            reader.close()
            raise
        finally:
            writer.close()  # the child's now: its exit shows here as end of file
        self.processes[reader] = process
        return reader

    def receive(self, readers: list[Connection], kind: str, timeout: float) -> list:
        """Wait until each of ``readers`` sent a ``kind`` message; their payloads, in the same order."""
        deadline = time.monotonic() + timeout
        got: dict[Connection, object] = {}
        pending = list(readers)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} of {len(readers)} client processes sent no {kind!r} "
                                   f"in {timeout}s")
            for reader in wait(pending, left):
                process = self.processes[reader]
                try:
                    what, payload = reader.recv()
                except EOFError:
                    process.join(1)
                    raise RuntimeError(f"client process {process.pid} exited (status {process.exitcode}) "
                                       f"before {kind!r}") from None
                if what == "error":
                    raise RuntimeError(f"client process {process.pid} failed:\n{payload}")
                if what != kind:
                    raise RuntimeError(f"client process {process.pid} sent {what!r}, expected {kind!r}")
                got[reader] = payload
                pending.remove(reader)
        return [got[reader] for reader in readers]

    def stop(self) -> None:
        """Tell every client to leave; SIGTERM by pid those still there after the grace, then SIGKILL."""
        self.leave.set()
        deadline = time.monotonic() + EXIT_GRACE
        processes = list(self.processes.values())
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join(2)
        for reader in self.processes:
            reader.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
