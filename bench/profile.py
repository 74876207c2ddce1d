"""``python -m bench profile``: where a no-op task's time goes, per process, sampled by py-spy.

It runs scenario 1 (N no-op tasks, results ignored) with one py-spy sampling
this client and another sampling the worker's supervisor and its children,
then prints, per process, CPU microseconds per task (psutil) and the
functions the samples were in most often (self time). py-spy samples without
pausing the processes (``--nonblocking``), so the figures are those of a
normal run, less a few percent for the sampling.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Worker
from bench.scenarios import throughput

__all__ = ("cannot_sample", "main", "self_time")

#: py-spy's frame text: ``function (file.py:line)``; the line number is dropped to group by function.
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def cannot_sample() -> str | None:
    """None when py-spy can sample this process (and so its siblings), else why not."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed: python3 -m pip install -e '.[bench]'"
    try:
        probe = subprocess.run(["py-spy", "dump", "--pid", str(os.getpid())], capture_output=True, text=True,
                               timeout=30)
    except subprocess.TimeoutExpired:
        return "py-spy dump did not answer in 30 s"
    if probe.returncode != 0:
        # Typically ptrace is refused: not root, or kernel.yama.ptrace_scope >= 1 without CAP_SYS_PTRACE.
        return f"py-spy cannot attach to a process here: {probe.stderr.strip().splitlines()[:1]}"
    return None


def _py_spy(pid: int, output: Path, rate: int, subprocesses: bool) -> subprocess.Popen:
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
            "--rate", str(rate), "--nonblocking"]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_py_spy(proc: subprocess.Popen) -> None:
    """SIGINT makes py-spy write its file; killed if it does not exit."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({os.path.basename(path) if path.startswith('/') else path})"


def self_time(raw: str) -> dict[str, collections.Counter]:
    """Samples per innermost function, per process, from py-spy's ``--format raw`` text.

    Each line is ``frame;frame;...;innermost count``; with ``--subprocesses``
    the leading frames name the process and its parents (``process
    PID:"command"``); the innermost is returned as ``process PID``. Without
    them the key is ``client``.
    """
    per_process: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        process = "client"
        while frames and frames[0].startswith("process "):  # parent first, then the child
            process = frames.pop(0).split(":", 1)[0]
        frames = [f for f in frames if not f.startswith("thread ")]
        if frames:
            per_process[process][_short(frames[-1])] += int(count)
    return per_process


def _print(title: str, counts: collections.Counter, top: int) -> None:
    total = sum(counts.values())
    print(f"\n{title}: {total} samples")
    for function, samples in counts.most_common(top):
        print(f"  {100 * samples / total:5.1f}%  {function}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--top", type=int, default=12, help="functions shown per process")
    parser.add_argument("--keep", metavar="DIR", help="keep py-spy's raw files in DIR")
    options = parser.parse_args(argv)
    reason = cannot_sample()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    out = Path(options.keep or tempfile.mkdtemp(prefix="engine-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    spies: list[subprocess.Popen] = []
    supervisor: list[int] = []

    def sample(worker: Worker) -> None:
        supervisor.append(worker.proc.pid)
        spies.append(_py_spy(worker.proc.pid, out / "worker.txt", options.rate, subprocesses=True))
        spies.append(_py_spy(os.getpid(), out / "client.txt", options.rate, subprocesses=False))
        time.sleep(1.0)  # py-spy attaches

    try:
        try:
            figures = throughput(options.tasks, options.concurrency, lambda fraction: None, started_worker=sample)
        finally:
            for spy in spies:
                _stop_py_spy(spy)
        print(f"{options.tasks:,} no-op tasks, concurrency {options.concurrency}: {figures['tasks_per_s']:,} "
              "tasks/s while sampled; CPU µs per task: "
              + ", ".join(f"{k} {v}" for k, v in figures["cpu_us_per_task"].items()))
        for name in ("client", "worker"):
            path = out / f"{name}.txt"
            if not path.exists():
                print(f"\n{name}: py-spy wrote nothing", file=sys.stderr)
                continue
            for process, counts in sorted(self_time(path.read_text()).items()):
                if process != "client":
                    pid = int(process.split()[-1])
                    process = "supervisor" if supervisor and pid == supervisor[0] else f"child {pid}"
                _print(process, counts, options.top)
    finally:
        if options.keep:
            print(f"\npy-spy raw files in {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
