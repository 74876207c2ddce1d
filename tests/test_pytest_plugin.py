"""The pytest plugin (issue 16, part): a user's tests using engine_worker, engine_eager and engine_app."""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)

PROJECT = '''
from engine import Engine

app = Engine("proj", transport="tcp://127.0.0.1:1", backend="memory://")


@app.task
def add(x, y):
    return x + y


@app.task
def fails():
    raise KeyError("broken")
'''

USER_TESTS = '''
import os

import pytest

from proj_tasks import add, fails


def test_add_through_a_real_worker(engine_worker, engine_app):
    assert add.delay(2, 2).get(timeout=30) == 4
    assert engine_worker.pid != os.getpid() and "ready." in engine_worker.log
    assert engine_app.conf.result_backend.startswith("sqlite:///")


def test_a_failure_comes_back(engine_worker):
    with pytest.raises(KeyError):
        fails.delay().get(timeout=30)


def test_add_eagerly(engine_eager):
    assert add.delay(3, 4).get() == 7  # runs here: no worker


@pytest.fixture
def engine_config():
    return {"task_default_queue": "custom"}


def test_engine_config_applies(engine_app):
    assert engine_app.conf.task_default_queue == "custom"
'''


def _project(pytester: pytest.Pytester, ini: str) -> None:
    pytester.makepyfile(proj_tasks=PROJECT, test_user=USER_TESTS)
    pytester.makeini(ini)


@pytest.mark.slow
def test_a_users_tests_pass_with_the_plugin_enabled_in_the_ini_file(pytester: pytest.Pytester):
    _project(pytester, "[pytest]\nengine_plugin = true\nengine_app = proj_tasks:app\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=4)


@pytest.mark.slow
def test_the_plugin_is_off_unless_enabled(pytester: pytest.Pytester):
    _project(pytester, "[pytest]\nengine_app = proj_tasks:app\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*fixture 'engine_worker' not found*"])
    enabled = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--engine-plugin", timeout=300)
    enabled.assert_outcomes(passed=4)


@pytest.mark.slow
def test_a_failing_test_shows_the_workers_log(pytester: pytest.Pytester):
    pytester.makepyfile(proj_tasks=PROJECT, test_failing='''
def test_fails_on_purpose(engine_worker):
    assert False, "on purpose"
''')
    pytester.makeini("[pytest]\nengine_plugin = true\nengine_app = proj_tasks:app\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*engine-worker log*", "*ready.*"])


@pytest.mark.slow
def test_a_test_run_that_dies_leaves_no_worker_behind(pytester: pytest.Pytester):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    pytester.makepyfile(proj_tasks=PROJECT, test_stuck='''
import time

def test_stuck(engine_worker):
    time.sleep(120)
''')
    pytester.makeini("[pytest]\nengine_plugin = true\nengine_app = proj_tasks:app\n")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"], cwd=str(pytester.path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def workers() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline", "cwd"]):
            try:
                if "proj_tasks:app" in (process.info["cmdline"] or []) and process.info["cwd"] == str(pytester.path):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    try:
        deadline = time.monotonic() + 60
        while not workers():
            assert time.monotonic() < deadline and run.poll() is None, "the worker never started"
            time.sleep(0.1)
        time.sleep(1.0)  # inside the test now
        os.kill(run.pid, signal.SIGKILL)  # the test run dies without any teardown
        run.wait(10)
        deadline = time.monotonic() + 30
        while workers():
            assert time.monotonic() < deadline, "a worker outlived the test run"
            time.sleep(0.1)
    finally:
        for process in workers():
            process.kill()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
