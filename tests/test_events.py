"""Events (issue 15, part): workers publish with -E; engine events and the dashboard (in a real browser) show them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from engine.events import ClusterState, EventReceiver, events_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = [sys.executable, "-c", "from engine.cli import main; main()"]


def test_the_events_endpoint_is_the_task_endpoint_plus_one():
    assert events_endpoint("tcp://127.0.0.1:5599") == "tcp://127.0.0.1:5600"
    assert events_endpoint("tcp://*:7000") == "tcp://*:7001"
    assert events_endpoint("ipc:///tmp/w.sock") == "ipc:///tmp/w.sock.events"
    with pytest.raises(ValueError, match="--events-endpoint"):
        events_endpoint("tcp://host-without-port")


def test_the_cluster_state_folds_events_into_rates_counts_and_failures():
    from engine.cli_events import render

    state = ClusterState()
    now = time.time()
    state.add("w1", ["worker-online", "w1", None, now, None, {"children": 2, "busy": 0, "waits": {"add": 0.004}}])
    for i in range(10):
        state.add("w1", ["received", f"t{i}", "add", now, None, None])
        state.add("w1", ["succeeded", f"t{i}", "add", now, 0.001, None])
    state.add("w1", ["failed", "t10", "boom", now, 0.002, "ValueError: boom"])
    snapshot = state.snapshot(now)
    worker = snapshot["workers"][0]
    assert worker["online"] and worker["ended"] == 11 and worker["tasks_per_s"] == pytest.approx(11 / 5, abs=0.1)
    add = next(task for task in snapshot["tasks"] if task["name"] == "add")
    assert add["received"] == 10 and add["succeeded"] == 10 and add["wait_s"] == 0.004
    assert snapshot["failures"][0]["error"] == "ValueError: boom"
    state.add("w1", ["worker-offline", "w1", None, now, None, {}])
    assert not state.snapshot(now)["workers"][0]["online"]
    assert render(snapshot) is not None  # the terminal view builds


@pytest.mark.slow
def test_a_worker_with_events_publishes_task_and_worker_events(worker_setup):
    from tests import workerapp

    receiver = EventReceiver(workerapp.app)
    try:
        worker_setup("--concurrency", "2", "-E", "-n", "eventful@test")
        seen: list[tuple[str, list]] = []
        deadline = time.monotonic() + 30
        while not seen:  # subscribed once the first event (online, or the next heartbeat) comes through
            assert time.monotonic() < deadline, "no event from the worker"
            seen += receiver.receive(0.2)
        result = workerapp.add.delay(1, 2)
        failing = workerapp.fails.delay("kaboom")
        while True:
            kinds = {(event[0], event[2]) for _, event in seen}
            if ("failed", "tests.workerapp.fails") in kinds and ("succeeded", "tests.workerapp.add") in kinds:
                break
            assert time.monotonic() < deadline, kinds
            seen += receiver.receive(0.2)
        assert result.get(timeout=10) == 3
        kinds = [(event[0], event[2]) for _, event in seen]
        for expected in (("received", "tests.workerapp.add"), ("started", "tests.workerapp.add"),
                         ("succeeded", "tests.workerapp.add"), ("failed", "tests.workerapp.fails")):
            assert expected in kinds, kinds
        failure = next(event for _, event in seen if event[0] == "failed")
        assert failure[1] == failing.id and "kaboom" in failure[5]
        assert {worker for worker, _ in seen} == {"eventful@test"}
    finally:
        receiver.close()


@pytest.mark.slow
def test_engine_events_dump_prints_json_lines(worker_setup):
    from tests import workerapp

    worker_setup("--concurrency", "1", "-E")
    proc = subprocess.Popen([*ENGINE, "events", "-A", "tests.workerapp", "--dump", "--duration", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **worker_setup.env})
    try:
        time.sleep(1.0)  # subscribed before the tasks run (PUB keeps nothing for late subscribers)
        for i in range(3):
            assert workerapp.add.delay(i, i).get(timeout=30) == 2 * i
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 0, err
    assert sum(1 for line in lines if line["type"] == "succeeded" and line["task"] == "tests.workerapp.add") == 3


@pytest.mark.slow
def test_the_dashboard_shows_a_worker_in_a_real_browser_and_its_counts_move(worker_setup):
    if not shutil.which("chromedriver"):
        if os.environ.get("CI") == "true":  # CI must run it (.ci/run installs the packages)
            pytest.fail("chromedriver is not on PATH but CI=true: apt-get install chromium chromium-driver")
        pytest.skip("Debian's chromium-driver is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from tests import workerapp
    from tests.worker_helpers import free_port

    worker_setup("--concurrency", "1", "-E", "-n", "shown@test")
    port = free_port()
    dashboard = subprocess.Popen([*ENGINE, "dashboard", "-A", "tests.workerapp", "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                 env={**os.environ, **worker_setup.env}, start_new_session=True)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    browser = None
    try:
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        browser.set_page_load_timeout(30)

        def table_text(name: str) -> str:
            return browser.find_element(By.CSS_SELECTOR, f"#{name} tbody").text

        deadline = time.monotonic() + 30
        while True:
            try:
                browser.get(f"http://127.0.0.1:{port}/")
                break
            except Exception:  # noqa: BLE001 - the server may not be listening yet
                assert time.monotonic() < deadline, dashboard.stderr.read() if dashboard.poll() is not None else ""
                time.sleep(0.2)
        while "shown@test" not in table_text("workers"):  # the heartbeat names the worker
            assert time.monotonic() < deadline, browser.page_source
            time.sleep(0.2)
        for i in range(5):
            assert workerapp.add.delay(i, i).get(timeout=30) == 2 * i
        deadline = time.monotonic() + 30
        while "tests.workerapp.add" not in table_text("tasks"):
            assert time.monotonic() < deadline, browser.page_source
            time.sleep(0.2)
        row = next(line for line in table_text("tasks").splitlines() if line.startswith("tests.workerapp.add"))
        assert row.split()[5] == "5"  # succeeded (after tasks/s, wait, received, started)
        assert workerapp.add.delay(5, 5).get(timeout=30) == 10
        while True:  # the count moves without reloading the page
            row = next(line for line in table_text("tasks").splitlines() if line.startswith("tests.workerapp.add"))
            if row.split()[5] == "6":
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.2)
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(dashboard.pid, signal.SIGKILL)
        dashboard.wait(10)
