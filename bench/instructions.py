"""``python -m bench instructions``: CPU instructions per task on the client, a child and the supervisor, by callgrind.

Timings on a shared 2-core VM move by 10-20% between runs of the same code;
an instruction count does not. This runs a client that sends N tasks (and,
for the baseline, none) under ``valgrind --tool=callgrind`` and prints the
difference per task: what one ``delay()`` costs the client's main thread and
its I/O thread, and what one member of ``group(...).apply_async()`` costs,
signature included. No worker is started: the messages wait in the outbox,
so only the sending side is counted. The child's figure runs the pool child's
per-task step (decode, trace, report to the pipe) in one process, without a
supervisor. Compare two commits by running it in a
worktree of each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

__all__ = ("count", "main")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The client run under callgrind: ``mode`` (delay or group) and how many tasks.
CLIENT = """
import os, sys
from engine import Engine, group
app = Engine("instructions", transport="tcp://127.0.0.1:9", backend=sys.argv[3] or None,
             producer_flush_timeout=0.1, set_as_current=True)
app.conf.producer_max_outbox = 10_000_000
@app.task
def add(x, y):
    return x + y
add.delay(0, 0)  # the producer and its I/O thread exist before counting starts to matter
n = int(sys.argv[2])
if sys.argv[1] == "group":
    group(add.s(i, i) for i in range(n)).apply_async()
else:
    for i in range(n):
        add.delay(i, i)
os._exit(0)  # nothing is delivered: no flush at exit
"""

#: A pool child's loop step run under callgrind: N no-op task messages are made, and run
#: (``run``) or not (``none``) through the child's path: decode, trace, report. The
#: reports go to /dev/null through the child's own FrameWriter.
CHILD = """
import os, sys
from engine import Engine
from engine.core import TaskMessage, encode_message
from engine.worker import child, pipe
app = Engine("instructions", transport="tcp://127.0.0.1:9", set_as_current=True)
@app.task(ignore_result=True)
def noop(x, y):
    pass
n = int(sys.argv[2])
raws = [encode_message(TaskMessage(id=f"{i:036d}", task=noop.name, args=(i, i), kwargs={})) for i in range(n)]
writer = pipe.FrameWriter(os.open(os.devnull, os.O_WRONLY), blocking=True)
recorder = child.ChildRecorder(writer, False)
app._producer = child.ChildProducer(writer)
revoked = set()
# A commit before the compiled step for plain tasks runs every message the general way.
run_plain = child.plain_runner(app.tasks, recorder, writer, "host", revoked).run if hasattr(child, "plain_runner") \
    else (lambda raw: None)
if sys.argv[1] == "child":
    for raw in raws:  # as the child's loop runs each task message
        if run_plain(raw) is None:
            child._run_one(raw, app.tasks, recorder, writer, "host", None, revoked)
        if writer.pending > 65536:
            writer.flush()
os._exit(0)
"""

#: The supervisor's per-task step run under callgrind, without sockets, pipes or processes: N
#: no-op task messages are received (the loop's ``_receive``, from a stand-in consumer that
#: yields frames of 200), handed to two stand-in children (FrameWriters to /dev/null) by the
#: ``--fair`` scheduler, and reported done (``supervisor``), or only made (``none``), as a
#: receive-dispatch-done cycle of the loop would see them.
SUPERVISOR = """
import collections, os, sys, time
import msgpack
from engine import Engine
from engine.core import TaskMessage, encode_message
from engine.worker import pipe
from engine.worker.supervisor import Supervisor
app = Engine("instructions", transport="tcp://127.0.0.1:9")
@app.task(ignore_result=True)
def noop(x, y):
    pass
class Child:
    def __init__(self, pid):
        self.pid, self.outstanding, self.accepting, self.queued_seconds = pid, collections.deque(), True, 0.0
        self.last_done = self.report_log = self.reader = None
        self.writer = pipe.FrameWriter(os.open(os.devnull, os.O_WRONLY), blocking=True)
class Pool:
    concurrency, by_fd, generation = 2, {}, 0
    def __init__(self):
        self.children = {1: Child(1), 2: Child(2)}
class Peer:
    route, name = b"client", "client"
class Consumer:
    frames = []
    def receive(self, sock):
        frames, self.frames = self.frames, []
        return frames
    def consumed(self, peer, queue, count):
        pass
    def ack(self, peer, ids):
        pass
supervisor = Supervisor(app, concurrency=2, use_journal=False, hostname="w@instructions", fair=True)
supervisor.pool = supervisor.limits.pool = Pool()
supervisor.consumer = consumer = Consumer()
n = int(sys.argv[2])
ids = [f"{i:036d}" for i in range(n)]
raws = [encode_message(TaskMessage(id=ids[i], task=noop.name, args=(i, i), kwargs={})) for i in range(n)]
dones = {i: msgpack.packb((i, "SUCCESS", 1e-05, False, 0)) for i in ids}
if sys.argv[1] == "supervisor":
    for start in range(0, n, 200):
        consumer.frames = [(Peer, b"frame", raws[start:start + 200])]
        supervisor._receive(None)
        while len(supervisor.scheduler):
            supervisor._dispatch()
            for child in supervisor.pool.children.values():  # each child's reports, read at once
                supervisor._handle_child_frames(child, [(pipe.DONE, dones[entry.message.id])
                                                        for entry in child.outstanding])
            supervisor.states.flush(time.monotonic())
os._exit(0)
"""


def count(mode: str, tasks: int, backend: str = "") -> int:
    """Instructions callgrind counts for ``tasks`` tasks sent the ``mode`` way, or run by a child (``child``)."""
    script = CLIENT if mode in ("delay", "group") else SUPERVISOR if mode.startswith("supervisor") else CHILD
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                           script, mode, str(tasks), backend], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=1800, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks sent in the counted run (default 20,000)")
    parser.add_argument("--backend", default="rpc://", help="the client's result backend (default rpc://)")
    options = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    print(f"instructions per task, {options.tasks:,} tasks sent minus none, backend {options.backend}:")
    for mode, label in (("delay", "add.delay(i, i)"), ("group", "group(add.s(i, i) ...) member")):
        per_task = (count(mode, options.tasks, options.backend) - count(mode, 0, options.backend)) / options.tasks
        print(f"  {label:32s} {per_task:10,.0f}")
    # The child's figure: the same messages made, run minus not run.
    per_task = (count("child", options.tasks) - count("none", options.tasks)) / options.tasks
    print(f"  {'child: a no-op task run':32s} {per_task:10,.0f}")
    per_task = (count("supervisor", options.tasks) - count("supervisor-none", options.tasks)) / options.tasks
    print(f"  {'supervisor: queued, handed, done':32s} {per_task:10,.0f}")
    return 0
