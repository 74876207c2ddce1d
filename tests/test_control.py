"""Remote control of real workers (issue 15, part): inspect, revoke everywhere a task waits, terminate, pool size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from engine import Engine, states
from engine.exceptions import TaskRevokedError
from engine.worker.revoked import RevokedSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The ``engine`` command, run as a subprocess.
ENGINE = [sys.executable, "-c", "from engine.cli import main; main()"]


def pids(worker) -> set[int]:
    return {p.pid for p in worker.children()}


def running_ids(control) -> list[str]:
    """The ids of the tasks running on every worker that answered."""
    replies = control.inspect(timeout=5).active() or {}
    return [task["id"] for tasks in replies.values() for task in tasks]


# --- in this process ------------------------------------------------------------------


def test_the_revoked_set_matches_ids_and_roots_expires_and_is_bounded():
    from engine.core import TaskMessage

    revoked = RevokedSet(max_entries=3, expires=10)
    revoked.add(["a"], root_ids=["chain-1"], now=100.0)
    assert revoked.matches(TaskMessage("a", "t"))
    assert revoked.matches(TaskMessage("step-2", "t", root_id="chain-1"))
    assert revoked.matches(TaskMessage("chain-1", "t"))  # a root is its own root
    assert not revoked.matches(TaskMessage("b", "t", root_id="other"))
    revoked.add(["b", "c"], now=101.0)
    assert len(revoked) == 3 and "a" not in revoked.entries  # the oldest went first
    revoked.purge(now=111.5)
    assert revoked.task_ids() == []  # all expired
    saved = {"x": 200.0, "y": 50.0}
    fresh = RevokedSet()
    fresh.load(saved, now=100.0)
    assert fresh.task_ids() == ["x"]


def test_nobody_answering_gives_no_replies_and_a_failing_exit_status():
    from tests.worker_helpers import free_endpoint

    app = Engine("nobody", transport=free_endpoint(), set_as_current=False)
    assert app.control.inspect(timeout=0.2).ping() is None
    assert app.control.ping(timeout=0.2) == []
    out = subprocess.run([*ENGINE, "inspect", "ping", "--endpoint", free_endpoint(),
                          "--timeout", "0.2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "no worker replied" in out.stderr


# --- through a real worker --------------------------------------------------------------


@pytest.mark.slow
def test_inspect_answers_every_question_and_the_cli_prints_json(worker_setup, tmp_path):
    from tests import workerapp

    worker = worker_setup("--concurrency", "2", "-n", "inspected@test")
    control = workerapp.app.control
    assert control.inspect(timeout=5).ping() == {"inspected@test": "pong"}
    assert workerapp.add.delay(2, 3).get(timeout=30) == 5
    gate = tmp_path / "gate"
    running = workerapp.tracked.delay(str(gate))
    later = workerapp.add.apply_async((1, 1), countdown=600)
    deadline = time.monotonic() + 30
    while not control.inspect(timeout=5).active()["inspected@test"] and time.monotonic() < deadline:
        time.sleep(0.05)
    inspect = control.inspect(timeout=5)
    active = inspect.active()["inspected@test"]
    assert [task["id"] for task in active] == [running.id] and active[0]["worker_pid"] in pids(worker)
    assert [item["request"]["id"] for item in inspect.scheduled()["inspected@test"]] == [later.id]
    assert "tests.workerapp.add" in inspect.registered()["inspected@test"]
    assert inspect.queues()["inspected@test"] == [{"name": "celery", "routing_key": "celery"}]
    stats = inspect.stats()["inspected@test"]
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2
    assert stats["counters"]["succeeded"] >= 1 and stats["counters"]["received"] >= 3
    figures = stats["tasks"]["tests.workerapp.add"]
    assert figures["by_state"]["SUCCESS"] >= 1 and figures["runtime_s"]["p95"] >= 0
    assert stats["rss_bytes"] > 0 and stats["journal"]["bytes"] > 0 and stats["clients"]
    gate.write_text("go")
    assert running.get(timeout=30) is not None

    out = subprocess.run([*ENGINE, "inspect", "stats", "-A", "tests.workerapp",
                          "--json", "--timeout", "5"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, **worker_setup.env})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["inspected@test"]["pool"]["max-concurrency"] == 2


@pytest.mark.slow
def test_a_revoked_task_never_starts_wherever_it_waits(worker_setup, tmp_path):
    from engine import chain
    from tests import workerapp

    journal = str(tmp_path / "journal.db")
    worker = worker_setup("--concurrency", "1", "--journal", journal)
    control = workerapp.app.control
    marks = tmp_path / "runs"
    gate = tmp_path / "gate"
    blocker = workerapp.tracked.delay(str(gate))  # holds the only child
    deadline = time.monotonic() + 30
    while not running_ids(control) and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = workerapp.log_run.delay(str(marks), "waiting")  # waits for the child
    held = workerapp.log_run.apply_async((str(marks), "held"), countdown=2)  # in the ETA heap
    steps = chain(workerapp.add.s(1, 1), workerapp.log_run.si(str(marks), "step-2")).apply_async()
    deadline = time.monotonic() + 30
    while len(control.inspect(timeout=5).reserved().popitem()[1]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    replies = control.revoke([waiting.id, held.id])
    assert sorted(replies.popitem()[1]["ok"]["revoked"]) == sorted([waiting.id, held.id])
    control.revoke_by_root(steps.parent.id)  # the chain, by its root: its second step never starts
    future = workerapp.log_run.apply_async((str(marks), "future"), task_id="decided-before-sent")
    control.revoke("not-sent-yet")
    late = workerapp.log_run.apply_async((str(marks), "late"), task_id="not-sent-yet")  # arrives revoked
    gate.write_text("go")
    assert blocker.get(timeout=30) is not None
    assert future.get(timeout=30) == "future"
    for result in (waiting, held, late):
        with pytest.raises(TaskRevokedError):
            result.get(timeout=30)
        assert result.state == states.REVOKED
    time.sleep(2.5)  # past the countdown
    assert not marks.exists() or set(marks.read_text().split()[::4]) == {"future"}

    # Restarted with the same journal, the worker still refuses them (a replayed or resent copy).
    worker.stop()
    worker_setup("--concurrency", "1", "--journal", journal)
    again = workerapp.log_run.apply_async((str(marks), "again"), task_id=waiting.id)
    with pytest.raises(TaskRevokedError):
        again.get(timeout=30)
    assert "again" not in marks.read_text()


@pytest.mark.slow
def test_terminate_stops_the_running_task_and_replaces_its_child(worker_setup, tmp_path):
    from tests import workerapp

    worker = worker_setup("--concurrency", "1")
    control = workerapp.app.control
    running = workerapp.sleepy.delay(60)
    deadline = time.monotonic() + 30
    while not running_ids(control) and time.monotonic() < deadline:
        time.sleep(0.05)
    before = pids(worker)
    with pytest.raises(ValueError, match="ignore SIGTERM"):
        from engine.worker.control import _signal_number

        _signal_number("SIGTERM")
    reply = running.revoke(terminate=True).popitem()[1]["ok"]
    assert reply["terminated"] == [running.id]
    with pytest.raises(TaskRevokedError, match="terminated"):
        running.get(timeout=30)
    assert workerapp.add.delay(1, 2).get(timeout=30) == 3  # a new child serves
    assert pids(worker) and not pids(worker) & before


@pytest.mark.slow
def test_pool_grow_and_shrink_and_shutdown(worker_setup):
    from tests import workerapp

    worker = worker_setup("--concurrency", "1", "-n", "resized@test")
    control = workerapp.app.control
    assert control.pool_grow(2, destination=["someone-else"], timeout=1) == {}  # not for this worker: not run
    assert control.pool_grow(2, destination=["resized@test"], timeout=5) == {"resized@test": {"ok": {"concurrency": 3}}}
    deadline = time.monotonic() + 30
    while len(pids(worker)) != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids(worker)) == 3
    assert control.pool_shrink(5, timeout=5).popitem()[1]["ok"] == {"concurrency": 1}  # at least one stays
    while len(pids(worker)) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids(worker)) == 1
    assert workerapp.add.delay(2, 2).get(timeout=30) == 4
    assert "error" not in control.shutdown(timeout=5).popitem()[1]
    assert worker.proc.wait(30) == 0  # a warm shutdown


def test_a_client_reports_its_backlog_per_queue():
    from tests.worker_helpers import free_endpoint

    app = Engine("backlog", transport=free_endpoint(), producer_flush_timeout=0.1, set_as_current=False)

    @app.task
    def noop():
        return None

    for _ in range(3):
        noop.delay()
    noop.apply_async(queue="other")
    stats = app.producer.stats()
    assert stats["outbox"] == {"celery": 3, "other": 1} and stats["outbox_total"] == 4
    assert stats["unacknowledged"] == 0 and stats["client_id"].startswith("client-")
    app.close()


@pytest.mark.slow
def test_metrics_and_health_are_served_and_parse(worker_setup):
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests import workerapp
    from tests.worker_helpers import free_port

    port = free_port()
    worker = worker_setup("--concurrency", "2", "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    for i in range(5):
        assert workerapp.add.delay(i, i).get(timeout=30) == 2 * i
    with pytest.raises(ValueError, match="boom"):
        workerapp.fails.delay("boom").get(timeout=30)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["engine_tasks"].samples}
        if samples.get(("engine_tasks_total", (("state", "FAILURE"), ("task", "tests.workerapp.fails")))) == 1:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    assert samples[("engine_tasks_total", (("state", "SUCCESS"), ("task", "tests.workerapp.add")))] == 5
    runtime = {s.labels.get("le"): s.value for s in families["engine_task_runtime_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["task"] == "tests.workerapp.add"}
    assert runtime["+Inf"] == 5
    assert families["engine_children"].samples[0].value == 2
    assert "engine_tasks_waiting" in families and "engine_client_credit" in families
    worker.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{base}/healthz", timeout=5)


def test_autoscale_takes_max_and_min():
    from engine.worker.autoscale import parse_autoscale

    assert parse_autoscale("10,3") == (10, 3) and parse_autoscale("3,10") == (10, 3) and parse_autoscale("4") == (4, 1)
    for bad in ("0,1", "a,b", "1,2,3", ""):
        with pytest.raises(ValueError, match="MAX,MIN"):
            parse_autoscale(bad)


@pytest.mark.slow
def test_autoscale_grows_under_a_burst_and_shrinks_when_idle(worker_setup):
    from tests import workerapp

    worker = worker_setup("--autoscale", "4,1", extra_env={"ENGINE_TEST_AUTOSCALE_KEEPALIVE": "1"})
    assert len(pids(worker)) == 1
    burst = [workerapp.sleepy.delay(0.5) for _ in range(12)]
    deadline = time.monotonic() + 30
    most = 1
    while not all(result.ready() for result in burst):
        most = max(most, len(pids(worker)))
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert most == 4  # grew to MAX under the burst, not beyond
    while len(pids(worker)) > 1:  # idle past the keepalive: back to MIN
        assert time.monotonic() < deadline + 30, pids(worker)
        time.sleep(0.1)
    assert workerapp.add.delay(1, 1).get(timeout=30) == 2


def test_revoked_ids_are_saved_one_by_one_and_reloaded(tmp_path):
    from engine.worker.journal import Journal

    revoked = RevokedSet(max_entries=2, expires=100)
    revoked.add(["a", "b"], now=1000.0)
    journal = Journal(str(tmp_path / "j.db"))
    journal.save_revoked(*revoked.take_changes())
    revoked.add(["c"], now=1001.0)  # "a" goes: over the bound
    added, removed = revoked.take_changes()
    assert added == {"c": 1101.0} and removed == {"a"} and not revoked.changed
    journal.save_revoked(added, removed)
    journal.close()
    reopened = Journal(str(tmp_path / "j.db"))
    assert reopened.revoked() == {"b": 1100.0, "c": 1101.0}
    reopened.close()


def test_revoked_changes_that_could_not_be_saved_are_saved_later_and_expired_rows_go():
    revoked = RevokedSet(expires=100)
    revoked.load({"old": 50.0, "kept": 500.0}, now=100.0)
    revoked.add(["new"], now=100.0)
    added, removed = revoked.take_changes()
    assert added == {"new": 200.0} and removed == {"old"}
    revoked.give_back_changes(added, removed)  # the save failed (a full disk)
    assert revoked.take_changes() == ({"new": 200.0}, {"old"})
