"""Workers on several hosts (issue 17): network namespaces on this machine, a name in a hosts file.

Each test builds its own lab (:mod:`tests.netns`): worker hosts, a client host
whose ``/etc/hosts`` maps ``workers.test`` to the worker hosts, and a Redis
result store on the bridge. The client runs :mod:`tests.netns_client` inside
its host with the transport ``dns+tcp://workers.test:5555``. Every execution
is recorded in a file named by the host that ran it, so the tests count what
ran where, what was lost (must be nothing) and what ran twice (reported).

Needs root and iproute2, as CI has (``.ci/run`` installs iproute2); skipped,
with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.redis_server import RedisServer
from tests import netns
from tests.test_drain import journal_rows
from tests.worker_helpers import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PORT = 5555
#: Where producers bind in the ventilator pattern.
PRODUCER_PORT = 6000
NAME = "workers.test"


class Cluster:
    """The lab's worker hosts, its client host and the Redis store, for one test."""

    def __init__(self, lab: netns.Lab, tmp_path) -> None:
        self.lab = lab
        self.tmp_path = tmp_path
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        self.redis = RedisServer(host=lab.gateway).start()
        try:
            self.client = lab.add_host("c")
        except BaseException:
            self.redis.stop()
            raise
        self.workers: dict[str, WorkerProcess] = {}
        #: The clients started, by host name: their process and report file.
        self._clients: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start_worker(self, name: str, *args: str, bind: bool = True,
                     hosts: dict[str, list[str]] | None = None) -> WorkerProcess:
        """A new host ``name`` (its ``/etc/hosts``: ``hosts``) running a worker, bound to port 5555 unless not ``bind``.

        Concurrency 2 unless ``args`` say; names re-resolved every 0.5 s (--connect dns+tcp://).
        """
        host = self.lab.add_host(name)
        host.write_hosts(hosts or {})
        env = {"ENGINE_TEST_HOST": name, "ENGINE_TEST_BACKEND": self.redis.url,
               "ENGINE_TEST_ENDPOINT": f"tcp://{host.address}:{PORT}", "ENGINE_TEST_DNS_REFRESH": "0.5",
               "ENGINE_STATE_DIR": str(self.tmp_path / f"state-{name}")}
        binding = ("--bind", f"tcp://0.0.0.0:{PORT}") if bind else ()
        worker = WorkerProcess(*binding, "--concurrency", "2", *args, env=env, prefix=host.prefix())
        self.lab.started(worker.pid)
        self.workers[name] = worker.wait_ready()
        return worker

    def name_resolves_to(self, *names: str) -> None:
        """Make ``workers.test`` resolve, in the client host, to the addresses of these worker hosts."""
        self.client.write_hosts({NAME: [self.lab.hosts[name].address for name in names]})

    def send_batch(self, tasks: int, seconds: float, timeout: float = 150, host: netns.Host | None = None,
                   bind_port: int | None = None) -> None:
        """Start a client in ``host`` (the client host): ``tasks`` tasks of ``seconds`` each.

        Sent to ``dns+tcp://workers.test:5555``, or, with ``bind_port``, to the workers that connect to it.
        Its executions are recorded under ``runs/<host>/``.
        """
        host = host or self.client
        report = self.tmp_path / f"report-{host.name}.json"
        runs = self.runs / host.name
        runs.mkdir(exist_ok=True)
        where = ["--bind-port", str(bind_port)] if bind_port else ["--transport", f"dns+tcp://{NAME}:{PORT}"]
        proc = subprocess.Popen(
            [*host.prefix(), sys.executable, "-m", "tests.netns_client", *where, "--backend", self.redis.url,
             "--runs", str(runs), "--tasks", str(tasks), "--seconds", str(seconds), "--timeout", str(timeout),
             "--out", str(report)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._clients[host.name] = (proc, report)
        self.lab.started(proc.pid)

    def report(self, host: netns.Host | None = None, timeout: float = 200) -> dict:
        """Wait for the client in ``host`` (the client host) to finish its batch; its report."""
        proc, report = self._clients[(host or self.client).name]
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the client did not finish its batch in time") from None
        assert proc.returncode == 0, output
        return json.loads(report.read_text())

    def executions(self, client: str = "*") -> dict[str, collections.Counter]:
        """Per worker host, how many times each task number of ``client`` (every client) ran."""
        ran: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for path in self.runs.glob(f"{client}/*.runs"):
            host = path.name.split("-", 1)[0]
            ran[host].update(int(line) for line in path.read_text().split())
        return ran

    def ran(self, host: str | None = None) -> int:
        """Executions so far, on ``host`` or everywhere."""
        ran = self.executions()
        return sum(sum(counter.values()) for name, counter in ran.items() if host in (None, name))

    def lost_and_duplicated(self, tasks: int, client: str = "c") -> tuple[list[int], int]:
        """The task numbers of ``client`` that never ran, and how many of its executions were repeats."""
        total: collections.Counter = collections.Counter()
        for counter in self.executions(client).values():
            total.update(counter)
        lost = [number for number in range(tasks) if total[number] == 0]
        return lost, sum(count - 1 for count in total.values() if count > 1)

    def close(self) -> None:
        """Stop the workers, the client and Redis, by pid (the lab removes the rest)."""
        try:
            for proc, _ in self._clients.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            for worker in self.workers.values():
                worker.kill()
        finally:
            self.redis.stop()


@pytest.fixture
def cluster(tmp_path):
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    with netns.Lab() as lab:
        cluster = Cluster(lab, tmp_path)
        try:
            yield cluster
        finally:
            cluster.close()


def _done_cleanly(report: dict, cluster: Cluster, tasks: int, client: str = "c") -> int:
    """Assert every task of ``client`` finished and none was lost; the number of duplicate executions (reported)."""
    assert report["missing"] == [] and report["states"] == {"SUCCESS": tasks}, report
    lost, duplicates = cluster.lost_and_duplicated(tasks, client)
    assert lost == []
    ran = {host: sum(counter.values()) for host, counter in sorted(cluster.executions(client).items())}
    print(f"\n{tasks} tasks from {client}: lost 0, duplicates {duplicates}, ran per host {ran}, {report['elapsed']} s")
    return duplicates


def test_tasks_spread_over_the_worker_hosts_a_name_resolves_to(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    cluster.send_batch(400, 0.005)
    report = cluster.report()
    duplicates = _done_cleanly(report, cluster, 400)
    assert duplicates == 0  # nothing failed: nothing ran twice
    assert cluster.ran("w1") >= 50 and cluster.ran("w2") >= 50


def test_a_worker_host_cut_off_mid_batch_loses_nothing(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1000
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 150, timeout=60, message="a quarter of the batch under way")
    cluster.lab.hosts["w1"].cut()
    on_w2 = cluster.ran("w2")
    # The client stops sending to the silent host and sends what it did not acknowledge elsewhere.
    wait_until(lambda: cluster.ran("w2") >= on_w2 + 300, timeout=90, message="the other host taking the work")
    # What the cut-off host had accepted (journaled) finishes there once it is back: nothing is lost.
    cluster.lab.hosts["w1"].reconnect()
    _done_cleanly(cluster.report(), cluster, tasks)


def test_a_worker_host_added_during_a_batch_takes_work_soon_after_the_name_resolves_to_it(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1500
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 100, timeout=60, message="the batch under way")
    cluster.start_worker("w3")
    cluster.name_resolves_to("w1", "w2", "w3")
    named = time.monotonic()
    wait_until(lambda: cluster.ran("w3") > 0, timeout=15, message="the new host taking work")
    delay = time.monotonic() - named
    print(f"\nthe new host ran its first task {delay:.2f} s after the name resolved to it")
    assert delay < 5.0  # refresh every 0.5 s: within a second or two, bounded generously
    _done_cleanly(cluster.report(), cluster, tasks)
    assert cluster.ran("w3") >= 50


def test_a_drained_worker_host_hands_its_tasks_back_and_leaves_an_empty_journal(cluster):
    journal = str(cluster.tmp_path / "w1-journal.db")
    first = cluster.start_worker("w1", "--shutdown-timeout", "10", "--journal", journal)
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1000
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 150, timeout=60, message="a quarter of the batch under way")
    cluster.name_resolves_to("w2")  # scaled down: the name no longer lists it ...
    assert first.stop(signal.SIGTERM, timeout=30) == 0  # ... and it is told to stop
    assert journal_rows(journal) == 0
    _done_cleanly(cluster.report(), cluster, tasks)


def test_workers_that_connect_follow_the_producers_a_name_resolves_to(cluster):
    # The ventilator pattern across hosts: producers bind, the worker connects to dns+tcp://producers.test.
    first, second = cluster.lab.add_host("p1"), cluster.lab.add_host("p2")
    cluster.send_batch(200, 0.005, host=first, bind_port=PRODUCER_PORT)
    worker = cluster.start_worker("w1", "--connect", f"dns+tcp://producers.test:{PRODUCER_PORT}", bind=False,
                                  hosts={"producers.test": [first.address]})
    _done_cleanly(cluster.report(first), cluster, 200, client="p1")
    # A second producer host joins the name: the worker connects to it within a refresh (0.5 s here).
    cluster.send_batch(200, 0.005, host=second, bind_port=PRODUCER_PORT, timeout=30)
    cluster.lab.hosts["w1"].write_hosts({"producers.test": [first.address, second.address]})
    _done_cleanly(cluster.report(second), cluster, 200, client="p2")
    assert "found in DNS: connecting to it" in worker.output
