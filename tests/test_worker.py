"""The real ``engine-worker``: dispatch, limits, children dying, shutdown, bad input.

Each test starts worker processes on free loopback ports with a fresh SQLite
result file, and stops them by pid; every wait is bounded.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from engine import states
from engine.exceptions import NotRegistered, TimeLimitExceeded, WorkerLostError
from tests import workerapp
from tests.worker_helpers import ROOT, free_endpoint, pids_alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def setup(worker_setup):
    """The worker launcher of ``tests/conftest.py`` (``worker_setup``), under this module's old name."""
    return worker_setup


def results_of(ids, timeout=30):
    """Wait for every id's result; return them in order."""
    return [workerapp.app.AsyncResult(task_id).get(timeout=timeout, propagate=False) for task_id in ids]


def read_runs(path):
    runs = {}
    if os.path.exists(path):
        for line in open(path):
            label, start, end, pid = line.split()
            runs[label] = (float(start), float(end), int(pid))
    return runs


def test_tasks_run_and_results_are_readable(setup):
    setup("--concurrency", "2")
    results = [workerapp.add.delay(i, i) for i in range(200)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(200)]
    assert results[0].state == states.SUCCESS


def test_children_are_forked_with_the_registry_and_stop_with_warm_shutdown(setup):
    worker = setup("--concurrency", "2")
    children = [p.pid for p in worker.children()]
    assert len(children) == 2
    pids = {workerapp.whoami.delay().get(timeout=20) for _ in range(20)}
    assert pids <= set(children)
    assert worker.stop(signal.SIGTERM) == 0
    assert pids_alive(children) == []
    assert "ready." in worker.output


def test_warm_shutdown_finishes_running_tasks(setup):
    worker = setup("--concurrency", "2")
    runs = setup.tmp / "runs.txt"
    result = workerapp.log_run.delay(str(runs), "slow", 1.0)
    # Acknowledged: the worker wrote it to a child's pipe before it sent the ack.
    wait_until(lambda: workerapp.app.producer.waiting == 0, 10, message="the worker took the task")
    assert workerapp.app.AsyncResult(result.id).state == states.PENDING
    assert worker.stop(signal.SIGTERM) == 0
    assert "slow" in read_runs(runs)
    assert result.get(timeout=5) == "slow"


def test_second_signal_is_a_cold_shutdown_leaving_no_children(setup):
    worker = setup("--concurrency", "2")
    children = [p.pid for p in worker.children()]
    workerapp.sleepy.delay(30)
    wait_until(lambda: workerapp.app.producer.waiting == 0, 10, message="the worker took the task")
    os.kill(worker.pid, signal.SIGTERM)
    # Two signals sent back to back may arrive as one: the second goes once the first was acted on.
    worker.wait_for_line("warm shutdown requested", 10)
    assert worker.stop(signal.SIGTERM, timeout=15) == 3
    assert pids_alive(children) == []


def test_sigkilled_supervisor_takes_its_children_with_it(setup):
    worker = setup("--concurrency", "2")
    children = [p.pid for p in worker.children()]
    workerapp.sleepy.delay(30)
    wait_until(lambda: workerapp.app.producer.waiting == 0, 10, message="a child was handed the task")
    os.kill(worker.pid, signal.SIGKILL)
    worker.proc.wait(10)
    wait_until(lambda: not pids_alive(children), 10, message="children exit after their supervisor died")


@pytest.mark.parametrize(("flags", "mode"), [((), "fair"), (("--fair",), "fair"), (("--no-fair",), "fifo")])
def test_the_fair_scheduler_is_the_default_and_no_fair_selects_fifo(setup, flags, mode):
    worker = setup("--concurrency", "1", *flags)
    assert f"mode: {mode}" in worker.wait_for_line("mode: ")
    assert workerapp.add.delay(2, 2).get(timeout=10) == 4


def test_child_killed_mid_task_fails_it_with_worker_lost_and_is_replaced(setup):
    worker = setup("--concurrency", "2")
    before = {p.pid for p in worker.children()}
    result = workerapp.crash.delay()
    with pytest.raises(WorkerLostError):
        result.get(timeout=20)
    wait_until(lambda: len(worker.children()) == 2, 10, message="a new child replaces the dead one")
    assert {p.pid for p in worker.children()} != before
    assert workerapp.add.delay(1, 1).get(timeout=10) == 2


def test_a_child_that_died_while_a_forked_copy_keeps_its_pipe_open_is_still_noticed(setup):
    # No end of file on its pipe: the supervisor's periodic look for exited children finds it.
    worker = setup("--concurrency", "2")
    before = {p.pid for p in worker.children()}
    pid_file = setup.tmp / "grandchild.pid"
    started = time.monotonic()
    try:
        with pytest.raises(WorkerLostError):
            workerapp.crash_leaving_a_grandchild.delay(str(pid_file), 60).get(timeout=30)
        assert time.monotonic() - started < 20  # well before the copy's 60 s end
        wait_until(lambda: len({p.pid for p in worker.children()} - before) >= 1, 10,
                   message="a new child replaces the dead one")
        assert workerapp.add.delay(1, 2).get(timeout=10) == 3
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_acks_late_reject_on_worker_lost_runs_the_task_again(setup):
    setup("--concurrency", "2")
    marker = setup.tmp / "crashed-once"
    assert workerapp.crash_once.delay(str(marker)).get(timeout=20) == "survived"
    assert marker.exists()


def test_hard_time_limit_kills_the_child_and_fails_the_task(setup):
    worker = setup("--concurrency", "2", "--time-limit", "0.5")
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        workerapp.sleepy.delay(20).get(timeout=20)
    assert time.monotonic() - started < 10
    wait_until(lambda: len(worker.children()) == 2, 10)
    assert workerapp.add.delay(2, 3).get(timeout=10) == 5


def test_soft_time_limit_raises_inside_the_task(setup):
    setup("--concurrency", "1", "--soft-time-limit", "0.3")
    assert workerapp.soft_limited.delay(5).get(timeout=20) == "cleaned up"


def test_max_tasks_per_child_replaces_children(setup):
    setup("--concurrency", "1", "--max-tasks-per-child", "3")
    pids = [workerapp.whoami.delay().get(timeout=20) for _ in range(7)]
    assert len(set(pids)) == 3  # 3 + 3 + 1
    assert pids[:3] == [pids[0]] * 3


def test_max_memory_per_child_replaces_a_child_over_the_limit(setup):
    setup("--concurrency", "1", "--max-memory-per-child", "150000")
    first = workerapp.hog.delay(200_000).get(timeout=20)
    second = workerapp.whoami.delay().get(timeout=20)
    assert first != second


def test_countdown_runs_when_due_in_order(setup):
    setup("--concurrency", "2")
    runs = setup.tmp / "runs.txt"
    sent = time.time()
    later = workerapp.log_run.apply_async((str(runs), "later"), countdown=1.0)
    sooner = workerapp.log_run.apply_async((str(runs), "sooner"), countdown=0.5)
    now = workerapp.log_run.delay(str(runs), "now")
    results_of([now.id, sooner.id, later.id])
    got = read_runs(runs)
    assert got["now"][0] < got["sooner"][0] < got["later"][0]
    assert got["sooner"][0] - sent >= 0.45 and got["later"][0] - sent >= 0.95


def test_retry_comes_back_with_its_countdown(setup):
    setup("--concurrency", "2")
    started = time.monotonic()
    assert workerapp.flaky.delay(2).get(timeout=20) == 2
    assert time.monotonic() - started >= 0.4  # two retries of 0.2 s


def test_reject_requeue_runs_the_task_again(setup):
    setup("--concurrency", "1")
    marker = setup.tmp / "rejected-once"
    assert workerapp.reject_once.delay(str(marker)).get(timeout=20) == "accepted"


def test_unknown_task_fails_with_not_registered(setup):
    setup("--concurrency", "1")
    result = workerapp.app.send_task("workerapp.does_not_exist", (1,))
    with pytest.raises(NotRegistered):
        result.get(timeout=20)


def test_unencodable_result_fails_with_a_clear_error(setup):
    setup("--concurrency", "1")
    result = workerapp.unencodable.delay()
    assert result.get(timeout=20, propagate=False).__class__.__name__ == "EncodeError"
    assert "object" in str(result.result)
    assert workerapp.add.delay(1, 2).get(timeout=10) == 3


def test_routing_to_a_queue_only_its_worker_consumes(setup):
    default_worker = setup("--concurrency", "1")
    slow_endpoint = free_endpoint()
    workerapp.app.close()
    workerapp.app.conf.transport = [setup.endpoint, slow_endpoint]
    slow_worker = setup("--concurrency", "1", "-Q", "slow", "--bind", slow_endpoint)
    slow_children = {p.pid for p in slow_worker.children()}
    default_children = {p.pid for p in default_worker.children()}
    assert {workerapp.on_slow_queue.delay().get(timeout=20) for _ in range(5)} <= slow_children
    assert {workerapp.whoami.delay().get(timeout=20) for _ in range(5)} <= default_children


def test_two_workers_share_one_clients_load(setup):
    first = setup("--concurrency", "1")
    second_endpoint = free_endpoint()
    workerapp.app.close()
    workerapp.app.conf.transport = [setup.endpoint, second_endpoint]
    second = setup("--concurrency", "1", "--bind", second_endpoint)
    results = [workerapp.sleepy.delay(0.05) for _ in range(40)]
    results_of([r.id for r in results])
    pids_first = {p.pid for p in first.children()}
    pids_second = {p.pid for p in second.children()}
    served = [workerapp.whoami.delay() for _ in range(1)]
    results_of([r.id for r in served])
    runs_first = sum(1 for line in first.lines if "sleepy" in line and "succeeded" in line)
    runs_second = sum(1 for line in second.lines if "sleepy" in line and "succeeded" in line)
    assert runs_first + runs_second == 40
    assert runs_first >= 8 and runs_second >= 8, (runs_first, runs_second)
    assert pids_first and pids_second


def test_fair_mode_lets_short_tasks_overtake_a_long_one(setup):
    setup("--concurrency", "2", "--fair")
    runs = setup.tmp / "runs.txt"
    path = str(runs)
    # Teach the worker the run times first, as a long-lived worker would know them.
    results_of([workerapp.long_task.delay(path, "warm-long", 0.3).id,
                workerapp.short_task.delay(path, "warm-short", 0.01).id])
    sent = time.time()
    ids = [workerapp.long_task.delay(path, "L1", 1.5).id, workerapp.long_task.delay(path, "L2", 1.5).id]
    ids += [workerapp.short_task.delay(path, f"S{i}", 0.01).id for i in range(20)]
    results_of(ids)
    got = read_runs(runs)
    short_waits = [got[f"S{i}"][0] - sent for i in range(20)]
    assert max(short_waits) < 1.0, short_waits  # default FIFO would wait for a long task


def test_restarted_fair_worker_remembers_which_kinds_are_long(setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = setup("--concurrency", "2", "--fair", extra_env=state)
    runs = setup.tmp / "runs.txt"
    path = str(runs)
    results_of([workerapp.long_task.delay(path, "warm-long", 0.3).id,
                workerapp.short_task.delay(path, "warm-short", 0.01).id])
    assert worker.stop(signal.SIGTERM) == 0  # the run times are saved in the journal file
    setup("--concurrency", "2", "--fair", extra_env=state)
    sent = time.time()
    # A worker without that history would start L1 and L2 at once and the short tasks would wait 1.5 s.
    ids = [workerapp.long_task.delay(path, "L1", 1.5).id, workerapp.long_task.delay(path, "L2", 1.5).id]
    ids += [workerapp.short_task.delay(path, f"S{i}", 0.01).id for i in range(20)]
    results_of(ids)
    got = read_runs(runs)
    short_waits = [got[f"S{i}"][0] - sent for i in range(20)]
    assert max(short_waits) < 1.0, short_waits


def test_default_mode_queues_short_tasks_behind_long_ones(setup):
    setup("--concurrency", "1", "--prefetch-multiplier", "4")
    runs = setup.tmp / "runs.txt"
    path = str(runs)
    sent = time.time()
    ids = [workerapp.long_task.delay(path, "L1", 1.0).id]
    ids += [workerapp.short_task.delay(path, f"S{i}", 0.01).id for i in range(3)]
    results_of(ids)
    got = read_runs(runs)
    assert min(got[f"S{i}"][0] for i in range(3)) - sent >= 0.9  # FIFO: behind the long task


def test_garbage_on_the_wire_is_dropped_and_the_worker_keeps_serving(setup):
    worker = setup("--concurrency", "1")
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(setup.endpoint)
    try:
        for frames in ([b"T", b"\xc1garbage"], [b"T", b"\x92\xc4\x03abc\xc4\x01z"], [b"X", b"??"], [b"only-one"],
                       [b"D", b"\xff"], [b"T", b"\x91\xc4\x05hello"]):
            sock.send_multipart(frames)
        # Frames are read in order: the last garbage batch's item is the third malformed task message.
        wait_until(lambda: worker.output.count("dropped a malformed task message") >= 3, 10,
                   message="the worker read every garbage frame")
        assert workerapp.add.delay(20, 22).get(timeout=20) == 42
        assert worker.proc.poll() is None
        assert "dropped" in worker.output
    finally:
        sock.close()


def test_producer_that_exits_at_once_loses_nothing(setup):
    setup("--concurrency", "2")
    script = textwrap.dedent("""
        import sys
        from tests import workerapp
        ids = [workerapp.add.delay(i, 1).id for i in range(500)]
        print("\\n".join(ids))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **setup.env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    assert len(ids) == 500
    assert results_of(ids) == [i + 1 for i in range(500)]


def test_tasks_sent_before_any_worker_starts_are_delivered(setup):
    script = textwrap.dedent("""
        from tests import workerapp
        ids = [workerapp.add.delay(i, 2).id for i in range(50)]
        print(" ".join(ids), flush=True)
    """)
    producer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **setup.env},
                                stdout=subprocess.PIPE, text=True)
    try:
        # One line in one write, once every delay() returned; then the script waits at exit for a worker.
        assert select.select([producer.stdout], [], [], 20)[0], "the script printed no task ids within 20s"
        ids = producer.stdout.readline().split()
        assert len(ids) == 50
        assert producer.poll() is None  # still holding its tasks: no worker yet
        setup("--concurrency", "1")
        producer.communicate(timeout=30)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(5)
    assert results_of(ids) == [i + 2 for i in range(50)]


def test_a_burst_wakes_the_producer_thread_once_and_credit_delivers_the_rest(setup, monkeypatch):
    # Waking the I/O thread per message cost ~40% of a client's CPU in a send loop.
    producer = workerapp.app.producer
    wakes = []
    wake = producer._wake
    monkeypatch.setattr(producer, "_wake", lambda: (wakes.append(1), wake()))
    ids = [workerapp.add.delay(i, 3).id for i in range(200)]  # no worker yet: no credit
    assert len(wakes) == 1
    # A queue waiting for credit does not hold back another queue's first message.
    monkeypatch.setattr(workerapp.app.conf, "producer_flush_timeout", 0.5)  # nobody takes that one
    workerapp.add.apply_async((1, 1), queue="nobody-consumes-this")
    assert len(wakes) == 2
    setup("--concurrency", "2")  # its credit frames wake the thread for the other 199
    assert results_of(ids) == [i + 3 for i in range(200)]
    workerapp.app.close()  # gives up on the unconsumed queue's task after 0.5 s


def test_ventilator_pattern_client_binds_workers_connect(setup):
    endpoint = free_endpoint()
    workerapp.app.close()
    workerapp.app.conf.update(transport=endpoint, transport_bind=True)
    setup("--concurrency", "1", "--connect", endpoint)
    assert [r.get(timeout=20) for r in [workerapp.add.delay(i, 0) for i in range(30)]] == list(range(30))


def test_rpc_backend_returns_results_to_the_caller(setup):
    workerapp.app.close()
    workerapp.app.conf.result_backend = "rpc://"
    setup("--concurrency", "2", extra_env={"ENGINE_TEST_BACKEND": "rpc://"})
    results = [workerapp.add.delay(i, 1) for i in range(300)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(300)]
    with pytest.raises(ValueError, match="boom"):
        workerapp.fails.delay("boom").get(timeout=20)
    assert workerapp.flaky.delay(1).get(timeout=20) == 1  # a retry sent from a child still replies here
    other = workerapp.app.AsyncResult("sent-by-someone-else")
    assert other.state == states.PENDING


def test_group_and_chain_through_the_worker(setup):
    setup("--concurrency", "2")
    from engine import chain, group

    assert group(workerapp.add.s(i, i) for i in range(10))().get(timeout=20) == [2 * i for i in range(10)]
    assert chain(workerapp.add.s(1, 2), workerapp.add.s(10), workerapp.add.s(100))().get(timeout=20) == 113
    failing = (workerapp.add.s(1, 2) | workerapp.fails.si("middle") | workerapp.add.s(5))()
    with pytest.raises(ValueError, match="middle"):
        failing.get(timeout=20)


def test_custom_states_and_started_are_visible_while_the_task_runs(setup):
    setup("--concurrency", "2")
    gate = setup.tmp / "gate"
    progress = workerapp.reports_progress.delay(str(gate))
    started = workerapp.tracked.delay(str(gate))
    wait_until(lambda: progress.state == "PROGRESS", 20, message="PROGRESS visible")
    assert progress.info == {"done": 50}
    wait_until(lambda: started.state == states.STARTED, 20, message="STARTED visible")
    assert set(started.info) == {"pid", "hostname"}
    gate.touch()
    assert progress.get(timeout=20) == started.get(timeout=20) == "finished"


def test_ignore_result_at_all_three_levels_stores_nothing(setup):
    setup("--concurrency", "1")
    runs = setup.tmp / "runs.txt"
    by_option = workerapp.ignored_by_option.delay(str(runs))
    by_call = workerapp.log_run.apply_async((str(runs), "call"), ignore_result=True)
    workerapp.app.conf.task_ignore_result = True
    try:
        by_setting = workerapp.log_run.delay(str(runs), "setting")
    finally:
        workerapp.app.conf.task_ignore_result = False
    wait_until(lambda: set(read_runs(runs)) == {"option", "call", "setting"}, 20, message="all three ran")
    assert workerapp.add.delay(1, 1).get(timeout=20) == 2  # later states are written, these never are
    assert [r.state for r in (by_option, by_call, by_setting)] == [states.PENDING] * 3


def test_custom_exception_comes_back_as_its_own_class(setup):
    setup("--concurrency", "1")
    with pytest.raises(workerapp.PaymentError) as info:
        workerapp.charge.delay("acct-7", 12.5).get(timeout=20)
    assert (info.value.account, info.value.amount) == ("acct-7", 12.5)


def test_a_task_calling_sys_exit_fails_and_the_child_keeps_serving(setup):
    worker = setup("--concurrency", "1")
    result = workerapp.exits.delay()
    assert type(result.get(timeout=20, propagate=False)).__name__ == "SystemExit"
    assert workerapp.add.delay(2, 2).get(timeout=20) == 4
    assert sum("retired" in line for line in worker.lines) == 0


def test_hard_time_limit_counts_from_each_tasks_own_start(setup):
    setup("--concurrency", "1", "--time-limit", "1.0", "--prefetch-multiplier", "4")
    results = [workerapp.sleepy.delay(0.4) for _ in range(4)]
    assert [r.get(timeout=30) for r in results] == [0.4] * 4


def test_oversized_message_is_refused_at_send(setup):
    from engine.exceptions import EncodeError

    workerapp.app.close()
    workerapp.app.conf.max_message_size = 64 * 1024
    try:
        with pytest.raises(EncodeError, match="max_message_size"):
            workerapp.add.delay("x" * 100_000, "")
    finally:
        workerapp.app.close()
        workerapp.app.conf.max_message_size = 16 * 1024 * 1024


def test_big_batches_are_split_below_the_frame_limit(setup):
    workerapp.app.close()
    workerapp.app.conf.max_message_size = 256 * 1024
    setup("--concurrency", "1", extra_env={})
    try:
        payload = "y" * 20_000
        results = [workerapp.add.delay(payload, str(i)) for i in range(60)]
        assert [len(r.get(timeout=30)) for r in results] == [20_000 + len(str(i)) for i in range(60)]
    finally:
        workerapp.app.close()
        workerapp.app.conf.max_message_size = 16 * 1024 * 1024


def test_an_idle_client_does_not_starve_a_busy_one(setup):
    setup("--concurrency", "1", "--prefetch-multiplier", "1")
    idle = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from tests import workerapp
        workerapp.add.delay(1, 1).get(timeout=20)
        print("idle", flush=True)
        time.sleep(30)
    """)], cwd=ROOT, env={**os.environ, **setup.env}, stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline().strip() == "idle"
        results = [workerapp.sleepy.delay(0.01) for _ in range(10)]
        assert [r.get(timeout=20) for r in results] == [0.01] * 10
    finally:
        idle.kill()
        idle.wait(10)


def test_warm_shutdown_with_retiring_children_finishes(setup):
    worker = setup("--concurrency", "1", "--max-tasks-per-child", "2")
    results = [workerapp.sleepy.delay(0.02) for _ in range(12)]
    worker.wait_for_line("retired", 20)  # the stop comes while children are being replaced
    assert worker.stop(signal.SIGTERM, timeout=30) == 0
    done = [r for r in results if r.state == states.SUCCESS]
    assert done  # what the worker had accepted ran; the rest stays with the client
    workerapp.app.conf.producer_flush_timeout = 0.5  # no worker is left to take the rest


def test_curve_admits_only_authorized_clients(setup, tmp_path):
    from engine.transport.security import make_keys

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    worker_public, worker_secret = make_keys(str(keys), "worker")
    good_public, good_secret = make_keys(str(keys), "good")
    _, bad_secret = make_keys(str(keys), "bad")
    clients.mkdir()
    (clients / "good.key").write_bytes(open(good_public, "rb").read())
    worker = setup("--concurrency", "1", "--curve-secret-key", worker_secret, "--curve-clients", str(clients), "-E")
    assert "CURVE" in worker.output and "events:" in worker.output  # events under CURVE too
    runs = setup.tmp / "runs.txt"
    app = workerapp.app
    app.close()
    app.conf.update(transport_curve_server_key=worker_public, transport_curve_client_key=bad_secret,
                    producer_flush_timeout=0.5)
    try:
        workerapp.log_run.delay(str(runs), "intruder")
        time.sleep(1.5)
        app.close()
        app.conf.transport_curve_client_key = good_secret
        assert workerapp.log_run.delay(str(runs), "friend").get(timeout=20) == "friend"
        from engine.events import EventReceiver

        receiver = EventReceiver(app)  # an authorized client reads the events (encrypted)
        try:
            deadline = time.monotonic() + 10
            while not receiver.receive(0.2):  # the next heartbeat, within 2 s
                assert time.monotonic() < deadline, "no event under CURVE"
        finally:
            receiver.close()
    finally:
        app.close()
        app.conf.update(transport_curve_server_key=None, transport_curve_client_key=None)
    assert set(read_runs(runs)) == {"friend"}


def test_sigkilled_supervisor_loses_nothing_it_accepted(setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = setup("--concurrency", "1", extra_env=state)
    runs = setup.tmp / "runs.txt"
    results = [workerapp.log_run.delay(str(runs), f"t{i}", 0.05) for i in range(40)]
    later = workerapp.log_run.apply_async((str(runs), "later"), countdown=2)
    wait_until(lambda: len(read_runs(runs)) >= 3, 20, message="some tasks ran")
    os.kill(worker.pid, signal.SIGKILL)
    worker.proc.wait(10)
    restarted = setup("--concurrency", "2", extra_env=state)
    assert [r.get(timeout=60) for r in results] == [f"t{i}" for i in range(40)]
    assert later.get(timeout=30) == "later"
    assert "replaying" in restarted.output


def test_countdown_task_survives_a_warm_restart(setup, tmp_path):
    state = {"ENGINE_STATE_DIR": str(tmp_path / "state")}
    worker = setup("--concurrency", "1", extra_env=state)
    result = workerapp.add.apply_async((40, 2), countdown=1.5)
    wait_until(lambda: workerapp.app.producer.waiting == 0, 10, message="the worker took the task")
    assert worker.stop(signal.SIGTERM) == 0
    assert "kept in the journal" in worker.output
    setup("--concurrency", "1", extra_env=state)
    assert result.get(timeout=30) == 42


def test_unwritable_journal_is_a_clear_start_up_error(setup, tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    worker = setup("--concurrency", "1", "--journal", str(not_a_directory / "j.db"), ready=False)
    assert worker.proc.wait(30) == 1
    assert "cannot write the worker journal" in worker.output


def test_full_disk_journal_is_a_clear_start_up_error(setup, tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mountpoint)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tiny tmpfs here (needs root and mount rights)")
    try:
        worker = setup("--concurrency", "1", "--journal", str(mountpoint / "j.db"), ready=False)
        assert worker.proc.wait(30) == 1
        assert "cannot write the worker journal" in worker.output
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_bounded_outbox_raises_or_blocks_by_setting(setup):
    from engine.exceptions import OutboxFull

    app = workerapp.app
    app.close()
    app.conf.update(producer_max_outbox=5, producer_outbox_full="raise", producer_flush_timeout=0.2)
    try:
        for i in range(5):
            workerapp.add.delay(i, i)  # no worker yet: they wait in the outbox
        with pytest.raises(OutboxFull):
            workerapp.add.delay(5, 5)
        app.close()
        app.conf.producer_outbox_full = "block"
        setup("--concurrency", "1")
        results = [workerapp.add.delay(i, 1) for i in range(100)]  # blocks while 5 are in flight
        assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(100)]
    finally:
        app.close()
        app.conf.update(producer_max_outbox=1_000_000, producer_outbox_full="block", producer_flush_timeout=30)


def test_bad_arguments_fail_the_task_and_the_worker_keeps_serving(setup):
    setup("--concurrency", "1")
    message = workerapp.add.build_message((1,))  # add needs two arguments; skip the client's check
    message.reply_to = workerapp.app.reply_address()
    workerapp.app.send_message(message)
    with pytest.raises(TypeError):
        workerapp.app.AsyncResult(message.id).get(timeout=20)
    assert workerapp.add.delay(1, 2).get(timeout=20) == 3
