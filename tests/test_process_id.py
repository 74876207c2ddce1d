"""engine.utils.process.pid(): the process id without a system call, renewed after fork."""

from __future__ import annotations

import os

from engine.utils import process


def test_pid_is_this_process_id():
    assert process.pid() == os.getpid()


def test_a_forked_child_reads_its_own_id(tmp_path):
    out = tmp_path / "pid"
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            out.write_text(f"{process.pid()} {os.getpid()}")
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    seen, actual = out.read_text().split()
    assert int(seen) == int(actual) == child
    assert process.pid() == os.getpid() != child
