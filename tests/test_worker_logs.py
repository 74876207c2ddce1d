"""Logging and process options (issue 16, part): --logfile and logrotate, JSON lines, --log-config, --pidfile."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from engine import signals
from engine.worker.logs import configure_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for_text(path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{text!r} not in {path}:\n{content}"
        time.sleep(0.05)


def test_a_setup_logging_receiver_leaves_the_root_logger_alone():
    root = logging.getLogger()
    before = list(root.handlers)
    calls = []

    def receiver(sender=None, loglevel=None, logfile=None, **kwargs):
        calls.append((loglevel, logfile))

    signals.setup_logging.connect(receiver)
    try:
        configure_logging("info", logfile="/nonexistent/dir/never-opened.log")
    finally:
        signals.setup_logging.disconnect(receiver)
    assert calls == [("INFO", "/nonexistent/dir/never-opened.log")] and root.handlers == before


@pytest.mark.slow
def test_logrotate_moves_the_file_then_sighup_and_no_line_is_lost(worker_setup, tmp_path):
    from tests import workerapp

    logfile = tmp_path / "worker.log"
    worker = worker_setup("--concurrency", "1", "--logfile", str(logfile), ready=False)
    _wait_for_text(logfile, "ready.")
    for i in range(3):
        assert workerapp.say.delay(f"before-{i}").get(timeout=30) == f"before-{i}"
    _wait_for_text(logfile, "said: before-2")
    rotated = tmp_path / "worker.log.1"
    os.rename(logfile, rotated)  # logrotate's move ...
    for i in range(3):  # lines written in between go to the moved file (or the new one): none is lost
        assert workerapp.say.delay(f"between-{i}").get(timeout=30) == f"between-{i}"
    os.kill(worker.pid, signal.SIGHUP)  # ... then its postrotate SIGHUP
    _wait_for_text(logfile, "reopened")
    for i in range(3):
        assert workerapp.say.delay(f"after-{i}").get(timeout=30) == f"after-{i}"
    new = _wait_for_text(logfile, "said: after-2")
    old = rotated.read_text()
    both = old + new
    for label in [f"{stage}-{i}" for stage in ("before", "between", "after") for i in range(3)]:
        assert both.count(f"said: {label}") == 1, label
    assert "said: after-0" in new and "said: before-0" in old
    assert worker.stop() == 0  # SIGHUP did not stop the worker, nor kill its children


@pytest.mark.slow
def test_json_log_lines_carry_the_task_name_and_id(worker_setup, tmp_path):
    from tests import workerapp

    logfile = tmp_path / "worker.jsonl"
    worker_setup("--concurrency", "1", "--logfile", str(logfile), "--log-format", "json", ready=False)
    _wait_for_text(logfile, "ready.")
    result = workerapp.say.delay("in json")
    assert result.get(timeout=30) == "in json"
    _wait_for_text(logfile, "said: in json")
    lines = [json.loads(line) for line in logfile.read_text().splitlines()]  # every line is one object
    said = next(line for line in lines if line["message"] == "said: in json")
    assert said["task_id"] == result.id and said["task_name"] == "tests.workerapp.say"
    assert said["levelname"] == "WARNING" and said["process"] != lines[0]["process"]  # from the child


@pytest.mark.slow
def test_a_yaml_log_config_is_applied(worker_setup, tmp_path):
    from tests import workerapp

    target = tmp_path / "configured.log"
    config = tmp_path / "logging.yaml"
    config.write_text(f"""
version: 1
formatters:
  plain: {{format: "CONFIGURED %(levelname)s %(message)s"}}
handlers:
  file: {{class: logging.FileHandler, filename: "{target}", formatter: plain}}
root: {{level: INFO, handlers: [file]}}
""")
    worker_setup("--concurrency", "1", "--log-config", str(config), ready=False)
    _wait_for_text(target, "ready.")
    assert workerapp.say.delay("configured").get(timeout=30) == "configured"
    assert "CONFIGURED WARNING said: configured" in _wait_for_text(target, "said: configured")


@pytest.mark.slow
def test_a_live_pidfile_refuses_a_second_worker_and_is_removed_at_exit(worker_setup, tmp_path):
    pidfile = tmp_path / "run" / "worker.pid"
    first = worker_setup("--concurrency", "1", "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == first.pid
    second = subprocess.run([sys.executable, "-m", "engine.cli", "-A", "tests.workerapp", "--pidfile", str(pidfile),
                             "--bind", "tcp://127.0.0.1:0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, **worker_setup.env, "ENGINE_STATE_DIR": str(tmp_path / "state2")})
    assert second.returncode == 1 and "names a running process" in second.stderr + second.stdout
    assert int(pidfile.read_text()) == first.pid  # untouched
    assert first.stop() == 0
    assert not pidfile.exists()
    pidfile.write_text("999999999\n")  # left by a worker that died: taken over
    third = worker_setup("--concurrency", "1", "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == third.pid
