"""A CI-sized run of every benchmark scenario, so the harness cannot rot (completion, not speed)."""

from __future__ import annotations

import os

import pytest

from bench.scenarios import BACKENDS, SCENARIOS, fairness

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["throughput", "results", "latency", "scaling", "memory", "journal"])
def test_scenario_completes(name):
    figures = SCENARIOS[name](300, 2, lambda fraction: None)
    assert figures
    if "tasks_per_s" in figures:
        assert figures["tasks_per_s"] > 0
    if name == "throughput":  # CPU clocks tick every 10 ms: 300 tasks may read as 0
        assert set(figures["cpu_us_per_task"]) == {"client", "supervisor", "children"}
        assert all(value >= 0 for value in figures["cpu_us_per_task"].values()), figures
    if name == "journal":  # the default worker and a --no-journal one both ran
        assert figures["with_journal_tasks_per_s"] > 0 and figures["without_journal_tasks_per_s"] > 0
    if name == "memory":  # RSS read at start, after N and after 2N tasks
        assert figures["supervisor_rss_mib_after_twice"] > 0 and len(figures["child_rss_mib_after_twice"]) == 2
    if name in ("results", "latency"):
        assert set(figures) == set(BACKENDS)
        for backend, numbers in figures.items():
            if "skipped" in numbers:  # redis, where no redis-server can be started
                assert backend == "redis" and os.environ.get("CI") != "true", numbers
            else:
                assert numbers["tasks"] > 0


@pytest.mark.slow
def test_a_chatty_worker_cannot_block_on_its_stderr():
    # DEBUG logs a line per task: 3,000 tasks overflow a pipe nobody reads (64 KiB).
    figures = SCENARIOS["throughput"](3000, 2, lambda fraction: None, ("--loglevel", "DEBUG"))
    assert figures["tasks"] == 3000


@pytest.mark.slow
def test_fairness_scenario_completes_with_short_durations():
    figures = fairness(0, 2, lambda fraction: None, long_s=0.2, short_s=0.001)
    assert set(figures) == {"fifo", "fair_cold", "fair_warm", "fair_restarted"}
    assert all(f["makespan_s"] > 0.2 for f in figures.values())


def test_table_puts_the_peers_beside_the_like_for_like_rows(capsys):
    from bench.table import print_table, rows

    wait = {"short_wait_p50_s": 0.1, "short_wait_max_s": 0.25, "makespan_s": 4.3}
    report = {"core": "cython", "machine": "m", "date": "d", "tasks": 10, "concurrency": 2, "results": {
        "throughput": {"tasks_per_s": 50_000, "cpu_us_per_task": {"client": 9.5, "supervisor": 8, "children": 7}},
        "latency": {"rpc": {"p50_ms": 0.5, "p99_ms": 1, "max_ms": 2}, "redis": {"skipped": "no redis-server"}},
        "fairness": {"fifo": wait, "fair_cold": wait},
        "memory": {"tasks": 100, "supervisor_rss_mib_before": 26.0, "supervisor_rss_mib_after": 29.5,
                   "supervisor_rss_mib_after_twice": 29.6, "child_rss_mib_after_twice": [20.0, 20.1]}},
        "celery": {"throughput": {"tasks_per_s": 1000},
                   "latency": {"p50_ms": 2.0, "p99_ms": 3, "max_ms": 4},
                   "fairness": {"short_wait_p50_s": 2.1, "short_wait_max_s": 4.25, "makespan_s": 4.3}},
        "dramatiq": {"skipped": "dramatiq is not installed"}}
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["no-op tasks/s (results ignored)"] == ("50,000", "1,000", "50.0x", "", "")
    assert table["CPU µs per no-op task: client / supervisor / children"][0] == "9.5 / 8 / 7"
    assert table["round trip p50/p99/max: rpc"][1:3] == ("", "4.0x at p50")
    assert table["round trip p50/p99/max: redis"][0] == "no redis-server"
    assert table["4L+50S short wait p50/max, makespan: fair_cold"][2] == "17.0x at max"
    assert table["4L+50S short wait p50/max, makespan: fifo"][2] == ""
    assert table["supervisor RSS at 0 / 100 / 200 tasks"][0] == "26.0 / 29.5 / 29.6 MiB"
    assert table["Dramatiq comparison"][0] == "skipped: dramatiq is not installed"
    report["dramatiq"] = {"throughput": {"tasks_per_s": 5000}, "latency": {"p50_ms": 5.0, "p99_ms": 9, "max_ms": 10}}
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["no-op tasks/s (results ignored)"][3:] == ("5,000", "10.0x")
    assert table["round trip p50/p99/max: rpc"][3:] == ("", "10.0x at p50")
    assert all(len(row) == 6 for row in rows(report))
    report["results"]["fair"] = {"2": {"fifo": 40_000, "fair": 38_000, "fair_vs_fifo": 0.95},
                                 "16": {"fifo": 39_000, "fair": 37_000, "fair_vs_fifo": 0.949}}
    report["results"]["chord"] = {"tasks": 100, "tasks_per_s": 8000, "body_delay_ms": 12.5}
    report["celery"].update(fair={"tasks_per_s": 800}, chord={"tasks_per_s": 400, "body_delay_ms": 100.0})
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["no-op tasks/s at concurrency 2: --no-fair / --fair"][1:3] == ("800 (-O fair)", "47.5x")
    assert table["no-op tasks/s at concurrency 16: --no-fair / --fair"][1:3] == ("", "")
    chord_row = next(row for name, row in table.items() if name.startswith("chord of 100"))
    assert chord_row[:3] == ("8,000; 12.5 ms", "400; 100.0 ms", "20.0x")
    print_table(report)
    out = capsys.readouterr().out
    assert "50.0x" in out and "10.0x" in out


@pytest.mark.slow
def test_peers_complete_a_small_run():
    from bench import celery_peer, dramatiq_peer, redis_server

    peers = [peer for peer in (celery_peer, dramatiq_peer) if peer.available() is None]
    if not peers:
        pytest.skip("neither celery nor dramatiq can run here (the bench extra, redis-server)")
    with redis_server.RedisServer() as server:
        for peer in peers:
            assert peer.throughput(server.url, 200, 2)["tasks_per_s"] > 0
            assert peer.latency(server.url, 20, 2)["tasks"] == 20
        if celery_peer in peers:
            assert celery_peer.fair(server.url, 200, 2)["tasks_per_s"] > 0
            figures = celery_peer.chord(server.url, 50, 2)
            assert figures["tasks"] == 50 and figures["body_delay_ms"] >= 0


def test_runs_are_summarised_by_their_medians():
    from bench.__main__ import median_of_runs

    runs = [{"results": {"throughput": {"tasks_per_s": v, "seconds": s}}, "celery": {"skipped": "no"}, "rss": [v]}
            for v, s in ((10, 0.5), (30, 0.1), (20, 0.2))]
    assert median_of_runs(runs) == {"results": {"throughput": {"tasks_per_s": 20, "seconds": 0.2}},
                                    "celery": {"skipped": "no"}, "rss": [10]}


def test_profile_counts_self_time_per_process():
    from bench.profile import self_time

    raw = "\n".join([
        'process 10:"engine-worker";run (engine/worker/supervisor.py:300);commit (engine/worker/journal.py:80) 7',
        'process 10:"engine-worker";run (engine/worker/supervisor.py:300);commit (engine/worker/journal.py:81) 3',
        'process 10:"engine-worker";process 11:"engine-worker";child_main (engine/worker/child.py:9) 5',
        "thread (0x7f);delay (engine/task.py:12);packb (/usr/lib/python3.11/site-packages/msgpack/__init__.py:3) 2",
        "not a sample line",
    ])
    counts = self_time(raw)
    assert counts["process 10"] == {"commit (engine/worker/journal.py)": 10}
    assert counts["process 11"] == {"child_main (engine/worker/child.py)": 5}
    assert counts["client"] == {"packb (msgpack/__init__.py)": 2}


@pytest.mark.slow
def test_profile_command_samples_client_supervisor_and_children(capsys):
    from bench.profile import cannot_sample, main

    reason = cannot_sample()
    if reason:  # py-spy needs ptrace (root, or a permissive kernel.yama.ptrace_scope)
        pytest.skip(reason)

    assert main(["--tasks", "20000", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "CPU µs per task" in out and "\nclient:" in out and "\nsupervisor:" in out and "\nchild " in out


@pytest.mark.slow
def test_clients_scenario_runs_a_late_clients_tasks_while_others_are_connected():
    from bench.scenarios import clients

    # Given 1 and then 10 connected client processes (a few active, the rest idle),
    # when one more client arrives while the active ones send no-op tasks ...
    figures = clients(2000, 2, lambda fraction: None, counts=(1, 10), samples=20)

    # ... then every row completes, and the late client's results came back in time (not starved).
    assert set(figures) == {"1", "10"}
    assert (figures["1"]["active"], figures["10"]["active"], figures["10"]["idle"]) == (1, 3, 7)
    for row in figures.values():
        assert row["tasks_per_s"] > 0 and row["starved_at_start"] == 0 and row["unfinished"] == 0, figures
        late = row["late"]
        assert late["starved"] == 0 and late["tasks"] >= 1, figures
        assert late["p99_ms"] < 5000, figures


def test_table_shows_the_clients_rows_and_a_starved_late_client():
    from bench.table import rows

    late = {"tasks": 50, "p50_ms": 1.5, "p99_ms": 9.0, "max_ms": 12.0, "first_ms": 3.0, "starved": 0, "timeout_s": 10.0}
    report = {"results": {"clients": {
        "10": {"clients": 10, "active": 3, "idle": 7, "tasks_per_s": 20_000, "late": late},
        "100": {"clients": 100, "active": 3, "idle": 97, "tasks_per_s": 19_000, "starved_at_start": 4,
                "tasks": 300_000, "unfinished": 250_000, "seconds": 330.2,
                "late": {**late, "starved": 1}}}}}
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["10 client(s), 3 active: no-op tasks/s"] == ("20,000", "not run", "", "not run", "")
    assert table["10 client(s): late client's wait p50/p99/max, rpc"][0] == "1.5/9.0/12.0 ms, first 3.0 ms"
    assert table["100 client(s), 3 active: no-op tasks/s"][0] == (
        "19,000 (4 of 100 clients' first task starved) (250,000 of 300,000 tasks not done in 330 s)")
    assert table["100 client(s): late client's wait p50/p99/max, rpc"][0] == "starved: a result took over 10 s"


@pytest.mark.slow
def test_the_fair_mixed_and_pipeline_scenarios_complete_in_both_modes():
    from bench import pipelines
    from bench.table import rows

    fair = pipelines.fair(300, 2, lambda fraction: None)
    assert set(fair) == {"2", "16"} and all(level["fifo"] > 0 and level["fair"] > 0 for level in fair.values())
    mixed = pipelines.mixed(200, 2, lambda fraction: None)
    assert mixed["fifo"]["slow_tasks"] == mixed["fair"]["slow_tasks"] == 2
    assert all(mixed[mode]["tiny_wait_p99_ms"] >= mixed[mode]["tiny_wait_p50_ms"] >= 0 for mode in ("fifo", "fair"))
    pipeline = pipelines.pipeline(300, 2, lambda fraction: None)  # also checks the group's results, in order
    assert {"sqlite", "rpc"} <= set(pipeline) and pipeline["rpc"]["fair"]["tasks"] == 300
    assert "tasks" in pipeline["redis"]["fair"] or "skipped" in pipeline["redis"]
    operating = pipelines.operating(300, 2, lambda fraction: None)
    assert operating["plain"] > 0 and operating["events+metrics_vs_plain"] > 0
    table = list(rows({"results": {"fair": fair, "mixed": mixed, "pipeline": pipeline, "operating": operating}}))
    assert any("--fair" in row[0] for row in table) and any(row[0].startswith("mixed") for row in table)
    assert any(row[0].startswith("no-op tasks/s: plain / -E") for row in table)


@pytest.mark.slow
def test_the_chord_scenario_times_its_body_after_the_header():
    from bench import pipelines

    figures = pipelines.chord(100, 2, lambda fraction: None)
    assert figures["tasks"] == 100 and figures["body_delay_ms"] >= 0 and figures["tasks_per_s"] > 0


def test_the_store_command_compares_time_ordered_and_random_ids(capsys):
    from bench.__main__ import main

    assert main(["store", "--rows", "2048", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "uuid7 (engine)" in out and "uuid4 (random)" in out and "random ids cost" in out


def test_the_instructions_command_says_when_valgrind_is_missing(monkeypatch, capsys):
    from bench import instructions

    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    assert instructions.main(["--tasks", "10"]) == 2
    assert "valgrind is not installed" in capsys.readouterr().err


@pytest.mark.slow
def test_the_instructions_command_counts_each_side_in_tens_of_thousands(capsys):
    import shutil

    from bench import instructions

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    assert instructions.main(["--tasks", "500"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    counts = [int(row[-1].replace(",", "")) for row in rows]
    assert len(counts) == 4 and all(5_000 < n < 500_000 for n in counts)
    assert [row[0] for row in rows] == ["add.delay(i,", "group(add.s(i,", "child:", "supervisor:"]


def test_the_completion_counter_counts_every_thread_and_a_forked_child_apart(tmp_path, monkeypatch):
    import threading

    from bench import apps

    monkeypatch.setenv("BENCH_COUNTER_DIR", str(tmp_path))
    monkeypatch.setattr(apps, "_local", threading.local())
    for _ in range(5):
        apps._bump()
    thread = threading.Thread(target=lambda: [apps._bump() for _ in range(7)])
    thread.start()
    thread.join(timeout=30)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        for _ in range(3):
            apps._bump()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert apps.completed(str(tmp_path)) == 15 and len(os.listdir(tmp_path)) == 3  # a file per thread
